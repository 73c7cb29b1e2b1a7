"""User-facing errors: the CLI prints them as one clear line instead of a traceback."""
from __future__ import annotations


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
