"""Live training telemetry: a plain log line per logging step, log_history.json growing during
the run, and TensorBoard scalars (loss, lr, temperature, accuracy, samples/s) from the default
`report_to: [tensorboard]` with our model."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from umarvel.training import stages
from umarvel.training.telemetry import format_line
from umarvel.training.trainer import ContrastiveTrainer

ROOT = Path(__file__).resolve().parents[1]
SCALARS = ("train/loss", "train/learning_rate", "train/temperature", "train/accuracy", "train/samples_per_second")


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar of the run's TensorBoard event files, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[float]] = {}
    for events in run_dir.glob("runs/*/events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return found


def test_a_run_logs_lines_grows_its_history_and_writes_tensorboard(tiny_workdir, monkeypatch, caplog):
    configs = stages.stage_configs(str(ROOT / "configs" / "tiny" / "progressive.yaml"),
                                   ["stages.mbeir.train.max_steps=3", "train.per_device_batch_size=4"])
    config = configs["mbeir"]
    config.model.backbone = "checkpoints/tiny-qwen2vl"
    assert config.train.report_to == ["tensorboard"] and config.model.temperature.learnable
    run_dir = Path(config.run.output_dir)
    seen_during_run = []
    original = ContrastiveTrainer.training_step

    def watch_history(self, *args, **kwargs):
        history = run_dir / "log_history.json"
        seen_during_run.append(len(json.loads(history.read_text())) if history.is_file() else 0)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContrastiveTrainer, "training_step", watch_history)
    with caplog.at_level(logging.INFO, logger="umarvel"):
        stages.train_contrastive(config)
    assert seen_during_run == [0, 1, 2], "log_history.json must grow at every logging step"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3 and lines[0].startswith("step 1/3 (33%) | loss ")
    for label in ("lr ", "temperature ", "accuracy ", "samples/s ", "ETA "):
        assert label in lines[1], lines[1]
    scalars = tensorboard_scalars(run_dir)
    for tag in SCALARS:
        assert len(scalars.get(tag, [])) == 3, f"{tag} missing from TensorBoard: {sorted(scalars)}"
    assert scalars["train/temperature"][-1] != 0.05, "the learnable temperature's trajectory is a scalar"


def test_log_line_format():
    line = format_line({"loss": 1.23456, "learning_rate": 4e-4, "temperature": 0.0481, "accuracy": 0.8125,
                        "samples_per_second": 123.45}, 12, 350, eta_seconds=754.2)
    assert line == ("step 12/350 (3%) | loss 1.2346 | lr 4.00e-04 | temperature 0.0481 | accuracy 0.812 | "
                    "samples/s 123.5 | ETA 0:12:34")
