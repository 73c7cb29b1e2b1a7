"""The run lifecycle: a finished run of the same config is skipped, one of another config is
refused with the differing keys, --force re-trains from an empty directory, --resume continues
only a matching run; stage names and sub-stage keys are checked before any work."""
from __future__ import annotations

import pytest

from umarvel.cli import main
from umarvel.config import ConfigError, load_config
from umarvel.errors import UmarvelError
from umarvel.training import runs
from umarvel.training.registry import run_stage


def _config(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", *overrides])


def _finish(config):
    run = runs.start(config)
    (run.directory / "pairs.jsonl").write_text("stale\n")
    runs.finish(run, {"steps": 1}, [{"loss": 1.0}])
    return run.directory


def test_a_finished_run_of_the_same_config_is_skipped(tmp_path):
    directory = _finish(_config(tmp_path, "train.learning_rate=1e-4"))
    stamp = (directory / "DONE").read_text()
    # settings that only change how a run is watched are not part of the fingerprint
    again = runs.start(_config(tmp_path, "train.learning_rate=1e-4", "train.logging_steps=3", "model.device=cpu"))
    assert again.finished and (directory / "DONE").read_text() == stamp
    assert (directory / runs.RUN_FILE).is_file()


def test_a_finished_run_of_another_config_names_the_keys_and_force_retrains(tmp_path):
    directory = _finish(_config(tmp_path, "train.learning_rate=1e-4"))
    changed = _config(tmp_path, "train.learning_rate=2e-4", "model.lora.r=4")
    with pytest.raises(UmarvelError, match=r"train\.learning_rate: 0\.0001 -> 0\.0002.*--force") as err:
        runs.start(changed)
    assert "model.lora.r: 8 -> 4" in str(err.value)
    run = runs.start(changed, force=True)
    assert not run.finished and run.resume_from is None
    assert not (directory / "DONE").exists() and not (directory / "pairs.jsonl").exists()
    assert load_config(directory / "config.yaml").train.learning_rate == 2e-4


def test_resume_continues_only_a_matching_unfinished_run(tmp_path):
    config = _config(tmp_path, "train.learning_rate=1e-4")
    runs.start(config)
    for step in (2, 10):  # complete checkpoints (tests/test_checkpoint_atomic.py: torn ones)
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()
        (tmp_path / "run" / f"checkpoint-{step}" / runs.COMPLETE).write_text("done\n")
    with pytest.raises(UmarvelError, match="--resume to continue it, or --force"):
        runs.start(config)
    assert runs.start(config, resume=True).resume_from.name == "checkpoint-10"
    with pytest.raises(UmarvelError, match=r"checkpoints of another config \(train\.learning_rate"):
        runs.start(_config(tmp_path, "train.learning_rate=3e-4"), resume=True)


def test_an_unfinished_run_of_another_config_without_checkpoints_starts_clean(tmp_path):
    runs.start(_config(tmp_path, "train.learning_rate=1e-4"))
    (tmp_path / "run" / "pairs.jsonl").write_text("stale\n")
    runs.start(_config(tmp_path, "train.learning_rate=5e-4"))
    assert not (tmp_path / "run" / "pairs.jsonl").exists()


def test_unknown_stage_names_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stage", "progresive", "--config", "configs/tiny/progressive.yaml"])
    assert "invalid choice: 'progresive'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a stage"):
        run_stage("progresive", None, [])


def test_unknown_sub_stages_and_keys_under_stages_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  nli: {train: {learning_rate: 1.0e-4}}\n  nil: {train: {learning_rate: 1.0}}\n")
    with pytest.raises(ConfigError, match=r"stages\.nil: unknown sub-stage; the progressive sub-stages are nli, cc3m, mbeir"):
        run_stage("progressive", str(bad), [])
    bad.write_text("stages:\n  nli: {train: {lr: 1.0e-4}}\n")
    with pytest.raises(ConfigError, match=r"stages\.nli.*train\.lr: unknown key"):
        load_config(bad)
    assert not (tmp_path / "runs").exists()
