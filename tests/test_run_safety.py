"""Run directories are safe: only a run of ours (run.json) is ever cleared, `--force` or not; a
finished run whose settings cannot be compared is an error, never skipped; a live run's
directory is locked against a second training; a saved model never replaces a directory that
is not one. Every refusal names the directory and leaves every file where it was."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import logging
import sys
from pathlib import Path

import pytest

from umarvel import process
from umarvel.cli import main
from umarvel.config import load_config
from umarvel.errors import UmarvelError
from umarvel.training import runs

ROOT = Path(__file__).resolve().parents[1]


def _config(run_dir, *overrides):
    return load_config(None, [f"run.output_dir={run_dir}", *overrides])


def _precious(tmp_path) -> Path:
    precious = tmp_path / "precious"
    (precious / "b").mkdir(parents=True)
    (precious / "a.txt").write_text("thesis\n")
    (precious / "b" / "c.txt").write_text("data\n")
    return precious


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags", [["--force"], []], ids=["force", "plain"])
def test_a_directory_that_is_not_a_run_is_never_cleared_or_trained_into(tmp_path, capsys, monkeypatch, flags):
    precious = _precious(tmp_path)
    before = _files(precious)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--stage", "hardneg", "--config", str(ROOT / "configs" / "tiny" / "hardneg.yaml"),
                 "--set", f"run.output_dir={precious}", *flags])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"umarvel: error: {precious} holds 2 files, e.g. a.txt, b/; it is not a umarvel run (no run.json): "
                   "choose another run.output_dir or remove it yourself")
    assert _files(precious) == before and sorted(p.name for p in precious.iterdir()) == ["a.txt", "b"]


def test_an_empty_directory_is_used_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    run = runs.start(_config(tmp_path / "empty"), force=True)
    assert not run.finished and (tmp_path / "empty" / runs.RUN_FILE).is_file()
    (tmp_path / "file").write_text("x\n")
    with pytest.raises(UmarvelError, match=f"^{tmp_path / 'file'} is a file, not a umarvel run"):
        runs.start(_config(tmp_path / "file"), force=True)
    assert (tmp_path / "file").read_text() == "x\n"


def test_force_clears_a_run_of_ours_and_finish_releases_its_lock(tmp_path):
    run = runs.start(_config(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / runs.LOCK).read_text())["pid"] == os.getpid()
    (tmp_path / "run" / "pairs.jsonl").write_text("stale\n")
    runs.finish(run, {"steps": 1}, [])
    assert not (tmp_path / "run" / runs.LOCK).exists()
    runs.start(_config(tmp_path / "run", "train.learning_rate=3e-4"), force=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "run.json", "run.lock"]


DAMAGE = {
    "missing": None,
    "garbled": "train: {learning_rate: [\n",
    "a YAML list": "- train\n- model\n",
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_finished_run_without_a_readable_config_yaml_is_compared_by_its_fingerprint(tmp_path, damage):
    config = _config(tmp_path / "run", "train.learning_rate=1e-4")
    runs.finish(runs.start(config), {"steps": 1}, [])
    path = tmp_path / "run" / "config.yaml"
    path.unlink() if DAMAGE[damage] is None else path.write_text(DAMAGE[damage])
    other = _config(tmp_path / "run", "train.learning_rate=2e-4")
    with pytest.raises(UmarvelError) as err:
        runs.start(other)
    assert str(err.value).startswith(f"{tmp_path / 'run'} is a finished run of another config (fingerprint "
                                     f"{runs.config_fingerprint(config)} -> {runs.config_fingerprint(other)} "
                                     "(its config.yaml ")
    assert "so the differing keys cannot be named" in str(err.value) and "--force" in str(err.value)
    assert (tmp_path / "run" / "DONE").is_file()
    assert runs.start(config).finished  # the same settings: the fingerprint says so


@pytest.mark.parametrize("record", ["{not json", '{"started": "2026-01-01"}', '["config_fingerprint"]'])
def test_a_finished_run_whose_run_json_is_unreadable_is_an_error(tmp_path, record):
    config = _config(tmp_path / "run")
    runs.finish(runs.start(config), {"steps": 1}, [])
    (tmp_path / "run" / runs.RUN_FILE).write_text(record)
    with pytest.raises(UmarvelError, match=f"^{tmp_path / 'run' / 'run.json'}: .*cannot be compared with this config"):
        runs.start(config)
    assert (tmp_path / "run" / "DONE").is_file() and not (tmp_path / "run" / runs.LOCK).exists()


def _start_in_child(run_dir: Path, learning_rate: str) -> subprocess.Popen:
    """Another process that starts a run in `run_dir` and keeps training (sleeps) until killed."""
    code = ("import sys, time\n"
            "from umarvel.config import load_config\n"
            "from umarvel.training import runs\n"
            f"runs.start(load_config(None, ['run.output_dir={run_dir}', 'train.learning_rate={learning_rate}']))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "started"
    return child


def test_a_second_training_never_clears_a_live_run_and_takes_over_once_it_is_gone(tmp_path):
    run_dir = tmp_path / "run"
    child = _start_in_child(run_dir, "1e-4")
    try:
        (run_dir / "log_history.json").write_text("[]\n")  # the live run at work
        before = _files(run_dir)
        with pytest.raises(UmarvelError) as err:
            runs.start(_config(run_dir, "train.learning_rate=5e-4"), force=True)
        assert str(err.value).startswith(f"{run_dir} is in use by a run started ")
        assert f"(pid {child.pid} on {socket.gethostname()})" in str(err.value)
        assert str(err.value).endswith(f"if that process is gone, remove {run_dir / 'run.lock'}")
        assert _files(run_dir) == before
    finally:
        child.kill()
        child.wait()
    run = runs.start(_config(run_dir, "train.learning_rate=5e-4"))  # the stale lock of a dead process
    assert not run.finished and not (run_dir / "log_history.json").exists()
    assert json.loads((run_dir / runs.LOCK).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("lock", [{"pid": 1, "host": "other-node", "started": "2026-12-01T10:00:00"}, "garbage"],
                         ids=["another host", "damaged"])
def test_a_lock_that_cannot_be_checked_holds(tmp_path, lock):
    run_dir = tmp_path / "run"
    runs.finish(runs.start(_config(run_dir)), {"steps": 1}, [])
    (run_dir / runs.LOCK).write_text(json.dumps(lock) if isinstance(lock, dict) else lock)
    before = _files(run_dir)
    expected = ("is in use by a run started 2026-12-01T10:00:00 (pid 1 on other-node)" if isinstance(lock, dict)
                else "run.lock: damaged run lock")
    with pytest.raises(UmarvelError, match=re.escape(expected)):
        runs.start(_config(run_dir, "train.learning_rate=7e-4"), force=True)
    assert _files(run_dir) == before


def test_other_ranks_follow_the_main_process(tmp_path, monkeypatch):
    """A rank other than 0 neither inspects, locks nor writes: it takes rank 0's decision (here:
    rank 0 cleared a finished run of another config under --force, which rank 1 alone would
    refuse) from the broadcast."""
    run_dir = tmp_path / "run"
    runs.finish(runs.start(_config(run_dir, "train.learning_rate=1e-4")), {"steps": 1}, [])
    before = _files(run_dir)
    decided = runs.Run(run_dir)
    monkeypatch.setattr(process, "is_main_process", lambda: False)
    monkeypatch.setattr(process, "from_main", lambda value: decided if value is None else value)
    assert runs.start(_config(run_dir, "train.learning_rate=9e-4")) is decided
    assert _files(run_dir) == before and not (run_dir / runs.LOCK).exists()
    monkeypatch.setattr(process, "from_main", lambda value: "rank 0: refused")
    with pytest.raises(UmarvelError, match="^rank 0: refused$"):
        runs.start(_config(run_dir, "train.learning_rate=9e-4"))


def test_a_saved_model_never_replaces_a_directory_that_is_not_one(tmp_path, tiny_model_dir):
    from umarvel import Embedder

    embedder = Embedder.from_pretrained(tiny_model_dir, trainable=True)
    precious = _precious(tmp_path)
    before = _files(precious)
    with pytest.raises(UmarvelError) as err:
        embedder.save_pretrained(precious)
    assert str(err.value) == (f"{precious} holds 2 files, e.g. a.txt, b/; it is not a saved embedder (no "
                              "embedder_config.json), so it is not replaced: choose another directory or remove it yourself")
    assert _files(precious) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious.")]
    saved = tmp_path / "saved"
    embedder.save_pretrained(saved)
    (saved / "stale.txt").write_text("old\n")
    embedder.save_pretrained(saved)  # a saved embedder is replaced whole
    assert (saved / "embedder_config.json").is_file() and not (saved / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "saved"]


def test_a_finished_run_of_the_same_config_says_it_is_skipped(tmp_path, caplog):
    run_dir = tmp_path / "run"
    runs.finish(runs.start(_config(run_dir)), {"steps": 1}, [])
    with caplog.at_level(logging.INFO, logger="umarvel"):
        assert runs.start(_config(run_dir)).finished
    assert f"{run_dir}: skipped (finished with this config)" in caplog.text
