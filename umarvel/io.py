"""Atomic file writes: a reader never sees a half-written artifact as complete."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def naming(target: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write into a full disk) or only a temporary
    stand-in for `target` (`.<name>.*` beside it) as the same error naming `target`, the path the
    user gave and can act on."""
    target = Path(target)
    try:
        yield
    except OSError as err:
        if err.filename is not None and not _stand_in(err.filename, target):
            raise
        raise OSError(err.errno, err.strerror or str(err), str(target)) from err


def _stand_in(path: str | os.PathLike, target: Path) -> bool:
    """Whether `path` is, or lies under, a temporary of the atomic writers for `target`."""
    try:
        first = Path(os.path.abspath(path)).relative_to(target.parent.absolute()).parts[0]
    except (ValueError, IndexError):
        return False
    return first.startswith(f".{target.name}.")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only on success."""
    target = Path(target)
    with naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with naming(target):
            yield Path(tmp)
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; it replaces `target` only when complete."""
    import shutil

    target = Path(target)
    with naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with naming(target):
            yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
