"""One lifecycle for every training run directory: start (or skip, or refuse), then finish.

A run directory records, in `run.json`, the fingerprint of the settings that shape what is
trained, and the resolved `config.yaml`. Starting a run compares the fingerprint with the new
config's (config.yaml names the differing keys):
  finished (DONE), same settings         -> nothing to do (a re-run of a recipe skips it)
  finished, other settings               -> error naming the differing keys; `force` re-trains
  unfinished with checkpoints, no resume -> error; `resume` continues only a matching run
  unfinished without checkpoints         -> started afresh (cleared if its config differs)
  run.json unreadable                    -> error: what cannot be compared is never "the same"
`force` deletes the directory's contents first, so no file of other settings (pairs, teacher
scores, checkpoints) is ever read back. Only a run of ours is ever cleared or trained into: a
directory that holds anything but has no run.json is refused, `force` or not (an empty one is
fine). The main process decides, under `run.lock` (its pid and host), held from start to
finish, so a second training started into a live run's directory is refused rather than
clearing it; other ranks follow its decision. Finishing writes log_history.json,
metrics.json and training.png, then DONE last, on the main process, and waits for every rank.

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
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import TrainerCallback

from umarvel import process
from umarvel.config import Config, save_config, to_dict, upgrade_moved_keys
from umarvel.errors import UmarvelError
from umarvel.io import atomic_write_json, atomic_write_text, create_exclusive, describe_contents

logger = logging.getLogger("umarvel")

DONE = "DONE"
RUN_FILE = "run.json"
LOCK = "run.lock"
COMPLETE = "COMPLETE"
TRAINING_PLOT = "training.png"
# Settings that change how a run is watched or where it runs, never what it learns.
NOT_SHAPING = (
    "model.device", "data.num_workers", "data.max_image_pixels", "train.logging_steps", "train.report_to", "train.save_steps",
    "train.save_total_limit", "encode.batch_size", "encode.cache_dir", "encode.use_gpu", "encode.shard_size",
    "eval.mbeir.pools", "eval.zeroshot.tasks", "eval.zeroshot.data", "eval.zeroshot.visdial_caption", "distill.shard_size",
    "run.output_dir", "run.cpu_threads",
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


# Settings that shape a run only while validation is on (they pick its best model): with
# train.eval_steps 0 they are left out, so runs recorded before they existed keep their fingerprint.
VALIDATION = ("train.eval_steps", "train.eval_queries", "train.eval_pool_size", "train.eval_metric")


def shaping_settings(config_dict: dict) -> dict[str, object]:
    flat = flatten(config_dict)
    left_out = NOT_SHAPING + (() if flat.get("train.eval_steps") else VALIDATION)
    return {k: v for k, v in flat.items() if k not in left_out}


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


def _refuse_foreign(run_dir: Path) -> None:
    """A directory that holds anything but is not a run of ours (no run.json) is never used,
    cleared or deleted: it may be anything, named by a typo in run.output_dir."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UmarvelError(f"{run_dir} is a file, not a umarvel run: choose another run.output_dir")
    if run_dir.is_dir() and not (run_dir / RUN_FILE).is_file() and any(p.name != LOCK for p in run_dir.iterdir()):
        raise UmarvelError(f"{run_dir} holds {describe_contents(run_dir)}; it is not a umarvel run (no {RUN_FILE}): "
                           "choose another run.output_dir or remove it yourself")


def _lock(run_dir: Path) -> None:
    """Take the directory's `run.lock` (pid, host, start time) for this process, so that a second
    training started into it cannot clear or overwrite a live run. A lock left by a process
    that is gone (same host, no such pid), or by this very process (an earlier run in it that
    stopped with an error), is taken over; one of another host cannot be checked, so it holds."""
    path = run_dir / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    while not create_exclusive(path, json.dumps(mine) + "\n"):
        holder = _lock_holder(path)
        if holder is None:
            continue  # released meanwhile
        if _alive(holder):
            raise UmarvelError(
                f"{run_dir} is in use by a run started {holder.get('started', '?')} (pid {holder['pid']} on "
                f"{holder['host']}): wait for it, or choose another run.output_dir; if that process is gone, "
                f"remove {path}"
            )
        logger.info("%s: taking over the lock of pid %s on %s, which is gone", run_dir, holder["pid"], holder["host"])
        path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict | None:
    """The lock's record (None once it is gone); a damaged one is refused, not taken over."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        holder = None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or not isinstance(holder.get("host"), str):
        raise UmarvelError(f"{path}: damaged run lock (expected pid and host); if no run uses "
                           f"{path.parent}, remove {path}")
    return holder


def _alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _unlock(run_dir: Path) -> None:
    """Release the lock if this process holds it."""
    path = run_dir / LOCK
    holder = _lock_holder(path) if path.exists() else None
    if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        path.unlink(missing_ok=True)


def _recorded_config(run_dir: Path) -> tuple[dict | None, str]:
    """(the run's config.yaml as a mapping, "") or (None, what is wrong with it)."""
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None, "is missing"
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        return None, f"is not readable YAML ({type(err).__name__})"
    if not isinstance(data, dict):
        return None, f"holds a {type(data).__name__}, not a mapping"
    return upgrade_moved_keys(data, str(path)), ""


def _differences(run_dir: Path, config: Config) -> list[str]:
    """The shaping settings in which the run differs from `config` ([] when the same).

    `run.json`'s fingerprint decides; config.yaml names the differing keys (and, read through
    today's schema, accepts a run whose fingerprint changed only because keys moved). What
    cannot be compared is an error, never taken for "the same".
    """
    path = run_dir / RUN_FILE
    try:
        recorded = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        recorded = f"not valid JSON ({err})"
    fingerprint = recorded.get("config_fingerprint") if isinstance(recorded, dict) else None
    if not isinstance(fingerprint, str):
        problem = recorded if isinstance(recorded, str) else "no config_fingerprint"
        raise UmarvelError(f"{path}: {problem}; this run's settings cannot be compared with this config: pass --force "
                           "to train it again (its contents are deleted), or set another run.output_dir")
    if fingerprint == config_fingerprint(config):
        return []
    old, problem = _recorded_config(run_dir)
    if old is None:
        return [f"fingerprint {fingerprint} -> {config_fingerprint(config)} (its config.yaml {problem}, "
                "so the differing keys cannot be named)"]
    return config_differences(old, to_dict(config))


def start(config: Config, *, resume: bool = False, force: bool = False) -> Run:
    """Decide what to do with `config.run.output_dir` (see the module docstring), record the
    config, seed everything and set the image pixel limit. Call it after the process group exists
    (all ranks): the main process alone inspects, locks, clears and records the directory; the
    other ranks follow its decision, or raise its error."""
    from transformers import set_seed

    from umarvel.data.images import set_max_pixels

    decision: Run | str | None = None
    if process.is_main_process():
        try:
            decision = _decide(Path(config.run.output_dir), config, resume, force)
        except Exception as err:
            process.from_main(f"the main process could not start the run: {err}")
            raise
    decision = process.from_main(decision)
    if isinstance(decision, str):
        raise UmarvelError(decision)
    if not decision.finished:
        set_seed(config.run.seed)
        set_max_pixels(config.data.max_image_pixels)
    return decision


def _decide(run_dir: Path, config: Config, resume: bool, force: bool) -> Run:
    """The main process's half of `start`, under the directory's lock (released again unless
    the run goes on)."""
    _refuse_foreign(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock(run_dir)
    try:
        run = _choose(run_dir, config, resume, force)
    except BaseException:
        _unlock(run_dir)
        raise
    if run.finished:
        _unlock(run_dir)
        return run
    # run.json first: a kill before config.yaml leaves a run that is still compared by fingerprint
    atomic_write_json(run_dir / RUN_FILE, {"config_fingerprint": config_fingerprint(config),
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    save_config(config, run_dir)
    return run


def _choose(run_dir: Path, config: Config, resume: bool, force: bool) -> Run:
    if force:
        _clear(run_dir, "--force")
        return Run(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        return Run(run_dir)
    differences, found = _differences(run_dir, config), checkpoints(run_dir)
    if is_done(run_dir):
        if differences:
            raise UmarvelError(_mismatch(run_dir, "is a finished run of another config", differences))
        logger.info("%s: skipped (finished with this config)", run_dir)
        return Run(run_dir, finished=True)
    if found and not resume:
        raise UmarvelError(
            f"{run_dir} holds checkpoints of an unfinished run: pass --resume to continue it, "
            "or --force to train it again from scratch"
        )
    if found and differences:
        raise UmarvelError(_mismatch(run_dir, "holds checkpoints of another config", differences))
    if differences:
        _clear(run_dir, "an unfinished run of another config without checkpoints")
    return Run(run_dir, resume_from=found[-1] if found else None)


def _clear(run_dir: Path, why: str) -> None:
    """Delete a run directory's contents but its lock (only ever a run of ours: see `_refuse_foreign`)."""
    entries = [p for p in run_dir.iterdir() if p.name != LOCK]
    if entries:
        logger.info("%s: deleting the contents of %s to train it afresh", why, run_dir)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _mismatch(run_dir: Path, what: str, differences: list[str]) -> str:
    shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    return (f"{run_dir} {what} ({shown}): pass --force to train it again with this config "
            "(its contents are deleted), or set another run.output_dir")


def finish(run: Run, metrics: dict, log_history: list) -> None:
    """Write the run's records (training.png: its curves), DONE last, on the main process;
    then wait for every rank."""
    from umarvel.evaluation.stage_report import write_training_plot

    if process.is_main_process():
        atomic_write_json(run.directory / "log_history.json", log_history)
        atomic_write_json(run.directory / "metrics.json", metrics)
        write_training_plot(run.directory / TRAINING_PLOT, log_history)
        atomic_write_text(run.directory / DONE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        _unlock(run.directory)
    process.barrier()
