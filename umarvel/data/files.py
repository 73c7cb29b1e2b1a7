"""The rules every dataset reader shares (M-BEIR, the training sources, the zero-shot sets):
a path named by a data file stays under the data root, and text is UTF-8.

Why here: a reader that opens `root / name` trusts the file it read `name` from; `../`, an
absolute path or a symlink would then read any file on the machine, and a byte that is not
UTF-8 would surface as a traceback from deep inside a parser. Each reader comes through these
functions, so the refusal and its message are the same everywhere.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from umarvel.errors import DataError

SYMLINK_SWITCH = "data.allow_symlinks_outside_root=true (umarvel data validate: --allow-symlinks-outside-root)"


def resolve_under(root: str | os.PathLike, rel_path: str, *, file: str | None = None, line: int | None = None,
                  field: str | None = None, must_exist: bool = True, symlinks_outside_root: bool = False,
                  what: str = "image") -> str:
    """Absolute path of `rel_path` inside `root`; absolute paths and `..` escapes are refused.

    Symlinks are resolved too: a link that leads out of the root (where a tree could read any
    file on the machine) is refused unless `symlinks_outside_root` (config key
    data.allow_symlinks_outside_root), for trees that link mbeir_images/ from another disk on
    purpose. Every reader of image and video paths (queries, pools, CC3M, validate, the
    zero-shot sets) comes through here; `what` names the kind of file in the messages.
    """
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, rel_path))
    if os.path.isabs(rel_path) or os.path.commonpath([base, full]) != base:
        raise DataError(f"{what} path '{rel_path}' resolves outside the data root {base}", file, line, field)
    if not symlinks_outside_root:
        real, real_base = _real_file(full), _real_dir(base)
        if not real.startswith(real_base.rstrip(os.sep) + os.sep):
            raise DataError(f"{what} path '{rel_path}' is a symlink to {real}, outside the data root {base}: copy the "
                            f"{what}s into the root, or set {SYMLINK_SWITCH}", file, line, field)
    if must_exist and not os.path.isfile(full):
        raise DataError(f"{what} not found: {full}", file, line, field)
    return full


def _real_file(full: str) -> str:
    """realpath of a file, with its directory's resolved once per process: images sit in few
    directories, and a full realpath per image costs 4x the rest of resolve_under."""
    if os.path.islink(full):
        return os.path.realpath(full)
    return os.path.join(_real_dir(os.path.dirname(full)), os.path.basename(full))


@functools.lru_cache(maxsize=4096)
def _real_dir(directory: str) -> str:
    return os.path.realpath(directory)


def decode_utf8(data: bytes, file: str | None = None, line: int = 1) -> str:
    """`data` (text starting on `line` of `file`) as a str; a byte that is not UTF-8 is a
    DataError naming the file, the line it is on, its column and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line += data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"not UTF-8 text: byte {data[err.start:err.start + 1]!r} at column {column}; re-save the "
                        "file as UTF-8", file, line) from None


def read_utf8(path: str | os.PathLike) -> str:
    """The whole text file, decoded by `decode_utf8` (the error names the line of a bad byte)."""
    return decode_utf8(Path(path).read_bytes(), str(path))
