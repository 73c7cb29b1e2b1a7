"""What a long run shows while it trains: one plain log line per `logging_steps` (and one per
validation, `umarvel.training.validation`), the same scalars in TensorBoard (or wandb), and a
`log_history.json` that grows during the run.

Every checkpoint and the last update are log points, so the step logs cover each update of the
run exactly once even across a resume: `run_loss` (metrics.json's train_loss) is their mean
over all updates, where the Trainer's own covers only the updates since the last start.

Cluster log files are not terminals: a tqdm bar there is one endless `\\r` line, so the bar
appears only when stderr is a TTY, and the log line is what a user tails. Samples/s is added
to the step logs themselves, so every logger the Trainer reports to records it.
"""
from __future__ import annotations

import datetime
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from umarvel.io import atomic_write_json
from umarvel.training.guards import FiniteWeights, check_loss
from umarvel.training.runs import CheckpointCompletion

logger = logging.getLogger("umarvel")

# Keys of a validation log (`eval_recall@5`): the Trainer's eval prefix and the metric
VALIDATION_PREFIX = "eval_"
# (step-log key, its label in the line, format)
SHOWN = (
    ("loss", "loss", "{:.4f}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("temperature", "temperature", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("kl", "kl", "{:.4f}"),
    ("samples_per_second", "samples/s", "{:.1f}"),
)


class TelemetryTrainer(Trainer):
    """A Trainer whose step logs carry samples/s and the means of the batch statistics the loss
    recorded since the last one (`record`), whose progress is logged as lines, and which stops
    on a non-finite loss or non-finite weights (`umarvel.training.guards`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats: dict[str, list[float]] = defaultdict(list)
        self.remove_callback(PrinterCallback)
        self.lines = LogLines(Path(self.args.output_dir))
        self.add_callback(self.lines)
        self.add_callback(CheckpointCompletion())
        self.add_callback(FiniteWeights())
        if sys.stderr.isatty():
            self.add_callback(_QuietProgressBar())

    @property
    def samples_per_update(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_loss(loss, self.state.global_step + 1, self.args.learning_rate)
        return loss

    def record(self, stats: dict) -> None:
        """Keep one batch's statistics (accuracy, temperature, ...) for the next step log."""
        for key, value in stats.items():
            self._stats[key].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({key: sum(values) / len(values) for key, values in self._stats.items()})
            self._stats.clear()
            started, first_step = self.lines.clock
            steps = self.state.global_step - first_step
            if steps > 0:
                logs["samples_per_second"] = steps * self.samples_per_update / (time.perf_counter() - started)
        super().log(logs, start_time)


class LogLines(TrainerCallback):
    """Rank 0: one line per step log (step/total, loss, lr, temperature, accuracy, samples/s,
    ETA) and log_history.json rewritten (atomically) after each. Its clock, started when training
    (or its resumed part) begins on every rank, also times the trainer's samples/s."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.clock: tuple[float, int] = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock = (time.perf_counter(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        atomic_write_json(self.run_dir / "log_history.json", state.log_history)
        if "loss" in logs:
            started, first_step = self.clock
            done = state.global_step - first_step
            eta = (time.perf_counter() - started) / done * (state.max_steps - state.global_step) if done > 0 else None
            logger.info(format_line(logs, state.global_step, state.max_steps, eta))
        elif any(key.startswith(VALIDATION_PREFIX) for key in logs):
            logger.info(format_validation_line(logs, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            atomic_write_json(self.run_dir / "log_history.json", state.log_history)


def run_loss(log_history: list[dict]) -> float:
    """Mean training loss over every update of the run: each step log is the mean over the
    updates since the previous one."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) > previous:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else float("nan")


def last_loss(log_history: list[dict]) -> float:
    """The last logged training loss (the mean over the updates since the log before it)."""
    return next((entry["loss"] for entry in reversed(log_history) if "loss" in entry), float("nan"))


def stage_summary(name: str, steps: int, global_batch: int, metrics: dict, log_history: list[dict]) -> str:
    """The line a finished stage prints: the loss as the mean over the run (what HF calls
    train_loss) beside the last logged one, so a falling loss is not read as a high final one."""
    line = (f"stage {name}: {steps} steps, global batch {global_batch}, "
            f"{metrics.get('train_samples_per_second', float('nan')):.1f} samples/s, "
            f"mean loss {metrics.get('train_loss', float('nan')):.4f}, last logged loss {last_loss(log_history):.4f}")
    return line + (f", temperature {metrics['temperature']:.4f}" if "temperature" in metrics else "")


def format_line(logs: dict, step: int, total: int, eta_seconds: float | None) -> str:
    """`step 12/350 (3%) | loss 1.2345 | lr 4.00e-04 | ... | ETA 0:12:34`."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    parts += [f"{label} {fmt.format(logs[key])}" for key, label, fmt in SHOWN if key in logs]
    if eta_seconds is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta_seconds))}")
    return " | ".join(parts)


def format_validation_line(logs: dict, step: int, total: int) -> str:
    """`step 20/350 (6%) | val recall@1 12.50 | recall@5 40.00 | recall@10 55.00 | runtime 3.20`."""
    shown = [f"{key[len(VALIDATION_PREFIX):]} {value:.2f}" for key, value in logs.items()
             if key.startswith(VALIDATION_PREFIX)]
    return f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) | val " + " | ".join(shown)


class _QuietProgressBar(ProgressCallback):
    """The stock step bar without its printed dict per log (the log line says it)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return
