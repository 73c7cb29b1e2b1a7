"""A checkpoint is complete or ignored: a kill while checkpoint-N is being written leaves a
directory without the COMPLETE marker, and --resume continues from the newest complete one
(with a warning naming the incomplete one). metrics.json's train_loss then covers every update
of the run, as in an uninterrupted run.

2 classes of incomplete checkpoint, one case each (TORN): a checkpoint cut before its
optimizer and trainer state were written, and one with every file but the marker (killed
between the last file and the marker). Plus the Trainer end to end on the tiny model.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from umarvel.config import load_config
from umarvel.training import runs

ROOT = Path(__file__).resolve().parents[1]

# name -> the files of a torn checkpoint-4 (next to a complete checkpoint-2)
TORN = {
    "cut before the optimizer and trainer state": ["adapter_model.safetensors"],
    "every file but the marker": ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"],
}


def _write_checkpoint(run_dir: Path, step: int, files: list[str], complete: bool) -> Path:
    directory = run_dir / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_text("x")
    if complete:
        (directory / runs.COMPLETE).write_text("done\n")
    return directory


@pytest.mark.parametrize("files", TORN.values(), ids=TORN.keys())
def test_resume_takes_the_newest_complete_checkpoint_and_names_the_torn_one(tmp_path, caplog, files):
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    runs.start(config)  # records the config, as the killed run did
    complete = _write_checkpoint(tmp_path / "run", 2, TORN["every file but the marker"], complete=True)
    torn = _write_checkpoint(tmp_path / "run", 4, files, complete=False)
    with caplog.at_level(logging.WARNING, logger="umarvel"):
        run = runs.start(config, resume=True)
    assert run.resume_from == complete
    assert str(torn) in caplog.text and runs.COMPLETE in caplog.text


def test_a_run_whose_only_checkpoint_is_torn_starts_afresh(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    runs.start(config)
    _write_checkpoint(tmp_path / "run", 2, ["adapter_model.safetensors"], complete=False)
    assert runs.start(config, resume=True).resume_from is None
    assert runs.start(config).resume_from is None  # no --resume needed: there is nothing to continue


class _Killed(Exception):
    pass


def test_a_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_workdir, monkeypatch):
    """The Trainer end to end: killed inside checkpoint-4's optimizer write, --resume continues
    from checkpoint-2 to the adapter, and the run loss, of the uninterrupted run."""
    from transformers import Trainer

    from umarvel.training import stages

    overrides = ["stages.nli.train.max_steps=6", "train.save_steps=2", "train.logging_steps=5",
                 "train.per_device_batch_size=4", "model.lora.dropout=0.0", "stages.nli.train.learning_rate=1e-3"]
    straight = stages.stage_configs(str(ROOT / "configs" / "tiny" / "progressive.yaml"), overrides)["nli"]
    straight.run.output_dir = "runs/straight"
    stages.train_contrastive(straight)
    assert all((Path(f"runs/straight/checkpoint-{n}") / runs.COMPLETE).is_file() for n in (4, 6))

    killed = load_config(Path("runs/straight/config.yaml"))
    killed.run.output_dir = "runs/killed"
    original = Trainer._save_optimizer_and_scheduler

    def killed_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise _Killed
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_at_step_4)
    with pytest.raises(_Killed):
        stages.train_contrastive(killed)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    torn = Path("runs/killed/checkpoint-4")
    assert (torn / "adapter_model.safetensors").is_file() and not (torn / runs.COMPLETE).exists()
    assert runs.start(killed, resume=True).resume_from == Path("runs/killed/checkpoint-2")

    stages.train_contrastive(killed, resume=True)
    a = load_file("runs/straight/model/adapter_model.safetensors")
    b = load_file("runs/killed/model/adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    straight_metrics = json.loads(Path("runs/straight/metrics.json").read_text())
    killed_metrics = json.loads(Path("runs/killed/metrics.json").read_text())
    assert killed_metrics["steps"] == straight_metrics["steps"] == 6
    assert killed_metrics["train_loss"] == pytest.approx(straight_metrics["train_loss"], abs=1e-6)


def test_the_run_loss_weighs_each_step_log_by_the_updates_it_covers():
    from umarvel.training.telemetry import run_loss

    history = [{"loss": 2.0, "step": 5}, {"learning_rate": 1e-4, "step": 5}, {"loss": 1.0, "step": 6},
               {"train_loss": 9.0, "step": 6}]
    assert run_loss(history) == pytest.approx((2.0 * 5 + 1.0) / 6)


def test_a_finished_stage_names_its_mean_and_its_last_loss():
    from umarvel.training.telemetry import last_loss, stage_summary

    history = [{"loss": 2.0, "step": 5}, {"loss": 1.0, "step": 6}, {"train_loss": 9.0, "step": 6}]
    assert last_loss(history) == 1.0 and math.isnan(last_loss([{"learning_rate": 1e-4, "step": 1}]))
    line = stage_summary("mbeir", 6, 32, {"train_samples_per_second": 4.0, "train_loss": 1.8333, "temperature": 0.05},
                         history)
    assert line == ("stage mbeir: 6 steps, global batch 32, 4.0 samples/s, mean loss 1.8333, "
                    "last logged loss 1.0000, temperature 0.0500")
    assert "temperature" not in stage_summary("reranker", 6, 32, {"train_loss": 1.0}, history)
