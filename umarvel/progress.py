"""Progress for every long loop (encoding, search, mining, reranking, shard writing): one helper.

On a terminal it is a tqdm bar. A redirected stderr (a cluster log, `umarvel demo > log 2>&1`)
is not a terminal: there a bar is one endless line of `\\r` fragments, so instead a plain
line is logged every `LINE_SECONDS` and when the loop ends, the way training logs its steps.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time

logger = logging.getLogger("umarvel")

LINE_SECONDS = 30.0
# A loop finished within this logs no line at all: the demo runs hundreds of sub-second encodes
# and searches, whose lines would bury the ones that matter.
QUIET_SECONDS = 5.0


def on_terminal() -> bool:
    """Whether stderr, where bars are drawn, is a terminal (or a notebook, where tqdm draws a widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(total: int, desc: str, unit: str = "it", *, enabled: bool = True, unit_scale: bool = False,
             line_seconds: float | None = None):
    """A bar with tqdm's `update`/`close`/context-manager interface: tqdm on a terminal, else
    periodic log lines (every `line_seconds`, default LINE_SECONDS); nothing when not `enabled`."""
    if on_terminal() or not enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=not enabled)
    return LineProgress(total, desc, unit, LINE_SECONDS if line_seconds is None else line_seconds)


def quiet_library_bars() -> None:
    """Off a terminal, turn off the bars transformers and huggingface_hub draw themselves
    (e.g. "Writing model shards"): their fragments would fill the log. The environment variable
    covers libraries imported later; ones already imported are told directly."""
    if on_terminal():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


class LineProgress:
    """`desc: 120/384 item (31%) | 45.2 item/s | ETA 0:00:06`, logged at most every
    `line_seconds`, and once at the end when anything was done and the loop either logged
    already or took QUIET_SECONDS or more."""

    def __init__(self, total: int, desc: str, unit: str, line_seconds: float):
        self.total, self.desc, self.unit, self.line_seconds = total, desc, unit, line_seconds
        self.n = 0
        self.started = self.last_line = time.perf_counter()
        self.closed = False
        self.logged = False

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.perf_counter()
        if now - self.last_line >= self.line_seconds and self.n < self.total:
            self.last_line = now
            self._log(now)

    def close(self) -> None:
        now = time.perf_counter()
        if not self.closed and self.n and (self.logged or now - self.started >= QUIET_SECONDS):
            self._log(now)
        self.closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, now: float) -> None:
        self.logged = True
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%)",
                 f"{rate:.1f} {self.unit}/s"]
        if self.n < self.total and rate > 0:
            parts.append(f"ETA {datetime.timedelta(seconds=round((self.total - self.n) / rate))}")
        else:
            parts.append(f"took {datetime.timedelta(seconds=round(elapsed))}")
        line = " | ".join(parts)
        if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
            logger.info(line)
        else:  # an API caller who asked for progress but set up no logging still sees it
            print(line, file=sys.stderr, flush=True)
