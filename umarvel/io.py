"""Atomic file writes: a reader never sees a half-written artifact as complete.

The temporary files and directories they start from (mkstemp: 0600, mkdtemp: 0700) are given
the permissions a plain `open`/`mkdir` would have under the process umask before they are renamed
into place: results, configs and caches on a shared cluster stay readable by the group.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from umarvel.errors import UmarvelError


def _umask() -> int:
    """The process umask (there is no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_dir(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """`tempfile.mkdtemp` in `parent`, with the permissions `mkdir` gives under the umask."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(path, 0o777 & ~_umask())
    return path


def describe_contents(directory: Path, shown: int = 3) -> str:
    """`3 files, e.g. a.txt, b/, c.json`: what a directory holds, for a refusal to touch it."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    return f"{len(names)} file{'s' if len(names) != 1 else ''}, e.g. {', '.join(names[:shown])}"


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
        os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        with naming(target):
            yield Path(tmp)
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_exclusive(target: str | os.PathLike, text: str) -> bool:
    """Write `text` to `target` whole, only if `target` does not exist yet (False then).

    The text is written to a temporary file first and hard-linked to `target`, which fails
    when it exists (also on NFS): a reader sees no file or the whole one, never half of it.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike, *, record: str, kind: str) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; it replaces `target` only when complete.

    An existing `target` is replaced only when it is empty or is what this writer makes (it
    holds `record`, e.g. embedder_config.json): a directory of anything else named by mistake
    is refused before any work, never deleted. The replaced one is moved to a fresh temporary
    name first, so no other file is ever removed.
    """
    target = Path(target)
    if target.is_dir() and any(target.iterdir()) and not (target / record).is_file():
        raise UmarvelError(f"{target} holds {describe_contents(target)}; it is not a saved {kind} (no {record}), so "
                           "it is not replaced: choose another directory or remove it yourself")
    if target.exists() and not target.is_dir():
        raise UmarvelError(f"{target} is a file, not a saved {kind}: choose another directory or remove it yourself")
    with naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_dir(target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with naming(target):
            yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
