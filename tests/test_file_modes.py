"""Files and directories umarvel writes get the permissions the umask gives a plain open/mkdir
(files 0666 & ~umask, directories 0777 & ~umask), not mkstemp's 0600 and mkdtemp's 0700:
results, configs, caches and saved models on a shared cluster are readable by the group."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from umarvel.config import load_config
from umarvel.data.sources import NLIPairs
from umarvel.io import atomic_dir, atomic_path, atomic_write_json, create_exclusive
from umarvel.training import runs

UMASKS = [0o002, 0o022]


@pytest.fixture(params=UMASKS, ids=["umask 002", "umask 022"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writers_respect_the_umask(tmp_path, umask):
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    with atomic_path(tmp_path / "shard.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.zeros(2))
    assert create_exclusive(tmp_path / "lock", "x\n") and not create_exclusive(tmp_path / "lock", "y\n")
    with atomic_dir(tmp_path / "model", record="record.json", kind="model") as tmp:
        (tmp / "record.json").write_text("{}\n")
    for name in ("metrics.json", "shard.npy", "lock"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert _mode(tmp_path / "model") == 0o777 & ~umask
    assert (tmp_path / "lock").read_text() == "x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", "metrics.json", "model", "shard.npy"]


def test_a_run_directory_and_a_table_cache_respect_the_umask(tmp_path, umask, synthetic_dir):
    runs.start(load_config(None, [f"run.output_dir={tmp_path / 'run'}"]))
    for name in ("config.yaml", "run.json", "run.lock"):
        assert _mode(tmp_path / "run" / name) == 0o666 & ~umask, name
    NLIPairs(synthetic_dir / "nli_for_simcse.csv", cache_dir=tmp_path / "cache")
    (table,) = (tmp_path / "cache").iterdir()
    assert _mode(table) == 0o777 & ~umask
    assert {_mode(p) for p in table.iterdir()} == {0o666 & ~umask}
