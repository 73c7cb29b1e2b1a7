"""One lifecycle for every training run directory: start (or skip, or refuse), then finish.

A run directory records the resolved `config.yaml` and, in `run.json`, the fingerprint of
the settings that shape what is trained. Starting a run compares them with the new config:
  finished (DONE), same settings         -> nothing to do (a re-run of a recipe skips it)
  finished, other settings               -> error naming the differing keys; `force` re-trains
  unfinished with checkpoints, no resume -> error; `resume` continues only a matching run
  unfinished without checkpoints         -> started afresh (cleared if its config differs)
`force` deletes the directory's contents first, so no file of other settings (pairs, teacher
scores, checkpoints) is ever read back. Finishing writes log_history.json and
metrics.json, then DONE last, on the main process, and waits for every rank.

A checkpoint counts only once it is complete: the Trainer writes checkpoint-N/ in place (adapter,
optimizer, scheduler, RNG states, DeepSpeed's global_stepN/ shards of every rank, trainer
state), and `CheckpointCompletion` writes its COMPLETE marker after all ranks are done. A
checkpoint without it (a kill while it was written) is ignored with a warning; resume takes
the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import TrainerCallback

from umarvel import process
from umarvel.config import Config, save_config, to_dict, upgrade_moved_keys
from umarvel.errors import UmarvelError
from umarvel.io import atomic_write_json, atomic_write_text

logger = logging.getLogger("umarvel")

DONE = "DONE"
RUN_FILE = "run.json"
COMPLETE = "COMPLETE"
# Settings that change how a run is watched or where it runs, never what it learns.
NOT_SHAPING = (
    "model.device", "data.num_workers", "data.max_image_pixels", "train.logging_steps", "train.report_to", "train.save_steps",
    "train.save_total_limit", "encode.batch_size", "encode.cache_dir", "encode.use_gpu", "encode.shard_size",
    "eval.mbeir.pools", "eval.zeroshot.tasks", "eval.zeroshot.data", "distill.shard_size", "run.output_dir",
)


def is_done(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).is_file()


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for every leaf of a nested mapping."""
    flat = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def shaping_settings(config_dict: dict) -> dict[str, object]:
    return {k: v for k, v in flatten(config_dict).items() if k not in NOT_SHAPING}


def config_fingerprint(config: Config) -> str:
    text = json.dumps(shaping_settings(to_dict(config)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every shaping setting that differs."""
    before, after = shaping_settings(old), shaping_settings(new)
    return [
        f"{key}: {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first; incomplete ones are named in a warning."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    found.sort(key=lambda p: int(p.name.split("-")[-1]))
    incomplete = [p for p in found if not (p / COMPLETE).is_file()]
    if incomplete and process.is_main_process():
        logger.warning("ignoring incomplete checkpoint(s) %s (no %s marker: the run stopped while writing them)",
                       ", ".join(str(p) for p in incomplete), COMPLETE)
    return [p for p in found if p not in incomplete]


class CheckpointCompletion(TrainerCallback):
    """Marks checkpoint-N complete once every rank has written its part of it (the Trainer calls
    `on_save` after the whole checkpoint, DeepSpeed state included); a marker left from an
    earlier write of the same step is removed before the Trainer starts writing."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        process.barrier()
        if state.is_world_process_zero:
            atomic_write_text(Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE,
                              f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        process.barrier()


@dataclass
class Run:
    """A started run: its directory, the checkpoint to resume from, or `finished` already."""

    directory: Path
    resume_from: Path | None = None
    finished: bool = False


def _recorded_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UmarvelError(f"{path}: not valid YAML ({err}); pass --force to train this run again") from None
    return upgrade_moved_keys(data, str(path)) if isinstance(data, dict) else None


def start(config: Config, *, resume: bool = False, force: bool = False) -> Run:
    """Decide what to do with `config.run.output_dir` (see the module docstring), record the
    config, seed everything and set the image pixel limit. Call it after the process group exists
    (all ranks)."""
    from transformers import set_seed

    from umarvel.data.images import set_max_pixels

    run_dir = Path(config.run.output_dir)
    recorded = _recorded_config(run_dir)
    differences = config_differences(recorded, to_dict(config)) if recorded is not None else []
    found = checkpoints(run_dir)
    if run_dir.exists() and (force or (differences and not found and not is_done(run_dir))):
        _clear(run_dir, "--force" if force else "an unfinished run of another config without checkpoints")
        differences, found = [], []
    elif is_done(run_dir):
        if differences:
            raise UmarvelError(_mismatch(run_dir, "is a finished run of another config", differences))
        logger.info("%s is finished (DONE) with this config; skipping", run_dir)
        return Run(run_dir, finished=True)
    elif found and not resume:
        raise UmarvelError(
            f"{run_dir} holds checkpoints of an unfinished run: pass --resume to continue it, "
            "or --force to train it again from scratch"
        )
    elif found and differences:
        raise UmarvelError(_mismatch(run_dir, "holds checkpoints of another config", differences))
    if process.is_main_process():
        save_config(config, run_dir)
        atomic_write_json(run_dir / RUN_FILE, {"config_fingerprint": config_fingerprint(config),
                                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    set_seed(config.run.seed)
    set_max_pixels(config.data.max_image_pixels)
    return Run(run_dir, resume_from=found[-1] if found else None)


def _clear(run_dir: Path, why: str) -> None:
    process.barrier()
    if process.is_main_process():
        logger.info("%s: deleting %s to train it afresh", why, run_dir)
        shutil.rmtree(run_dir)
    process.barrier()


def _mismatch(run_dir: Path, what: str, differences: list[str]) -> str:
    shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    return (f"{run_dir} {what} ({shown}): pass --force to train it again with this config "
            "(its contents are deleted), or set another run.output_dir")


def finish(run: Run, metrics: dict, log_history: list) -> None:
    """Write the run's records, DONE last, on the main process; then wait for every rank."""
    if process.is_main_process():
        atomic_write_json(run.directory / "log_history.json", log_history)
        atomic_write_json(run.directory / "metrics.json", metrics)
        atomic_write_text(run.directory / DONE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    process.barrier()
