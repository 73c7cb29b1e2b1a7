"""Loading the two pickle-based releases without running their code.

A pickle can call any importable function while it loads. CC-Neg's `.pt` goes through
`torch.load(weights_only=True)` (tensors and plain containers only); MSVD's captions through an
unpickler that resolves no global but set/frozenset, so only builtin containers, strings and
numbers load.
Anything else is refused with a message naming the file: never unpickled.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from umarvel.errors import DataError


def load_torch_plain(path: Path):
    """A torch file holding tensors and plain containers; a file that needs code is refused."""
    import torch

    if not path.is_file():
        raise DataError("file not found; see README (Zero-shot evaluation)", file=str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"refused: the file needs objects beyond tensors and plain containers to load ({first}); "
                        "umarvel never unpickles arbitrary objects. Convert it to plain dicts/lists/str/tensors "
                        "with a trusted tool first", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise _not_utf8(err, path) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise DataError(f"not a readable torch file: {err}", file=str(path)) from None


def _not_utf8(err: UnicodeDecodeError, path: Path) -> DataError:
    """A pickled string whose bytes are not UTF-8 (a pickle has no lines: the bad byte is named)."""
    return DataError(f"not UTF-8 text: a string in it holds byte {err.object[err.start:err.start + 1]!r} at "
                     f"position {err.start + 1} of the string; re-write the file with UTF-8 strings", file=str(path))


_CONTAINERS = {"set": set, "frozenset": frozenset}  # the containers older protocols name as globals


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in _CONTAINERS:
            return _CONTAINERS[name]
        raise pickle.UnpicklingError(f"global {module}.{name}")


def load_plain_pickle(path: Path):
    """A pickle of builtin containers, strings and numbers; anything naming a class is refused."""
    if not path.is_file():
        raise DataError("file not found; see README (Zero-shot evaluation)", file=str(path))
    try:
        return _NoGlobals(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise DataError(f"refused: the pickle asks for {err}; only builtin containers, strings and numbers "
                        "are loaded (umarvel never unpickles arbitrary objects)", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise _not_utf8(err, path) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as err:
        raise DataError(f"not a readable pickle: {err}", file=str(path)) from None
