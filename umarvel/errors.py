"""User-facing errors: the CLI prints them as one clear line instead of a traceback."""
from __future__ import annotations

import errno
import sys
from pathlib import Path


class UmarvelError(Exception):
    """Bad input from the user (config, data, paths); the message says what and where."""


class DataError(UmarvelError, ValueError):
    """A dataset file is wrong; the message names the file, the line and the field."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        where = ":".join(str(x) for x in (file, line) if x is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")

    def __reduce__(self):
        """Pickle with its parts (a worker process sends it back to the main one whole)."""
        return type(self), (self.message, self.file, self.line, self.field)

class CacheError(UmarvelError):
    """A cache entry is damaged; the message names the entry and the directory to delete."""


# errno -> what to do about it, for the errors a user (not the code) causes and can fix.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there or write elsewhere",
    errno.EROFS: "a read-only file system: choose a writable directory",
    errno.EACCES: "check the permissions of the file and its directory, or choose another path",
    errno.EPERM: "check the permissions of the file and its directory, or choose another path",
    errno.ENOTDIR: "a part of the path is not a directory: choose another path",
    errno.EISDIR: "a directory is where a file is expected: choose another path",
    errno.ENOENT: "check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def system_error_message(err: BaseException) -> str | None:
    """One line for an error of the system or of the files a user gave (an OSError such as a full
    disk or a read-only directory, text that is not UTF-8, an image PIL refuses): the path, what
    happened and what to do. None for any other exception: a programming error keeps its traceback.
    """
    pil = sys.modules.get("PIL.Image")
    if isinstance(err, OSError):
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        what = err.strerror or str(err)
        hint = _OS_ERROR_HINTS.get(err.errno)
        blocker = _file_in_the_way(err.filename) if err.errno in (errno.ENOTDIR, errno.EEXIST) else None
        if blocker is not None:
            hint = f"{blocker} is a file, not a directory: choose another path"
        message = f"{paths}: {what}" if paths else what
        return _one_line(f"{message} ({hint})" if hint else message)
    if isinstance(err, UnicodeDecodeError):
        return _one_line(f"a file is not {err.encoding.upper()} text: {err.reason} at byte {err.start} "
                         "(convert it to UTF-8, e.g. with iconv)")
    if pil is not None and isinstance(err, pil.DecompressionBombError):
        return _one_line(f"{err} (an image larger than PIL's pixel limit)")
    return None


def _file_in_the_way(path) -> str | None:
    """The part of `path` that exists and is not a directory, where a directory was needed."""
    if path is None:
        return None
    for part in reversed([Path(path), *Path(path).parents]):
        if part.exists() and not part.is_dir():
            return str(part)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())
