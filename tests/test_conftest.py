"""tests/conftest.py's scheduling under pytest-xdist: `-n auto` stays within a 24 GiB machine,
and modules with slow tests start first."""
from __future__ import annotations

import os

import conftest

pytest_plugins = ["pytester"]


def test_auto_workers_are_the_usable_cores_capped(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == conftest.MAX_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == 2


def test_modules_with_slow_tests_run_first_and_stay_whole(pytester):
    pytester.makeconftest("from conftest_under_test import pytest_collection_modifyitems\n")
    pytester.syspathinsert(os.path.dirname(conftest.__file__))
    (pytester.path / "conftest_under_test.py").write_text(open(conftest.__file__).read())
    pytester.makepyfile(
        test_a="def test_a1(): pass\ndef test_a2(): pass\n",
        test_b="import pytest\ndef test_b1(): pass\n@pytest.mark.slow\ndef test_b2(): pass\n",
        test_c="def test_c1(): pass\n",
    )
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider")
    collected = [line for line in result.outlines if "::" in line]
    assert collected == ["test_b.py::test_b1", "test_b.py::test_b2", "test_a.py::test_a1", "test_a.py::test_a2",
                         "test_c.py::test_c1"]
