"""The training stages by name: the one table `umarvel train --stage NAME` dispatches on.

A stage runs from a config file and overrides and returns the run directories it finished.
`progressive` and its sub-stages read the config's `stages:` section; a sub-stage name on a
config without one trains that config as a single contrastive stage.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from umarvel.config import PROGRESSIVE_STAGES, ConfigError, load_config, read_raw

logger = logging.getLogger("umarvel")


@dataclass(frozen=True)
class Stage:
    help: str
    run: Callable[..., list[Path]]


def _progressive(name: str | None):
    def run(path, overrides, *, resume, force):
        from umarvel.training.stages import run_progressive

        if name is not None and not read_raw(path, overrides).get("stages"):
            return _contrastive(path, overrides, resume=resume, force=force)
        return run_progressive(path, overrides, only=name, resume=resume, force=force)

    return run


def _contrastive(path, overrides, *, resume, force):
    from umarvel.training.stages import describe_global_batch, train_contrastive

    config = load_config(path, overrides)
    logger.info(describe_global_batch(config))
    return [train_contrastive(config, resume=resume, force=force)]


def _reranker(path, overrides, *, resume, force):
    from umarvel.training.rerank import train_reranker

    return [train_reranker(load_config(path, overrides), resume=resume, force=force)]


def _distill(path, overrides, *, resume, force):
    from umarvel.training.distill import distill

    return [distill(load_config(path, overrides), resume=resume, force=force)]


STAGES: dict[str, Stage] = {
    "progressive": Stage("stage 1, every sub-stage of the config's `stages:` (NLI -> CC3M -> M-BEIR)", _progressive(None)),
    **{name: Stage(f"stage 1, only the {name} sub-stage", _progressive(name)) for name in PROGRESSIVE_STAGES},
    "hardneg": Stage("stage 2b, continual training with mined hard negatives", _contrastive),
    "reranker": Stage("stage 3a, the YES/NO reranker", _reranker),
    "distill": Stage("stage 3b, recall + rerank distilled into the embedder (same as `umarvel distill`)", _distill),
}


def run_stage(name: str, path: str | None, overrides: list[str], *, resume: bool = False,
              force: bool = False) -> list[Path]:
    if name not in STAGES:
        raise ConfigError(f"--stage {name!r} is not a stage; the stages are {', '.join(STAGES)}")
    return STAGES[name].run(path, overrides, resume=resume, force=force)
