"""scripts/pytest_cpu_time.py: each test's CPU seconds count the child processes it waited for
(launchers and their ranks), so a suite's cost can be measured on a loaded machine."""
from __future__ import annotations

import json
import os
from pathlib import Path

pytest_plugins = ["pytester"]

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BURN = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.5: pass\n"


def test_a_tests_cpu_seconds_include_its_child_processes(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    out = pytester.path / "cpu.jsonl"
    monkeypatch.setenv("CPU_TIME_OUT", str(out))
    pytester.makepyfile(test_inner=f"""
import subprocess, sys
def test_child():
    subprocess.run([sys.executable, "-c", {BURN!r}], check=True)
def test_nothing():
    pass
""")
    result = pytester.runpytest_subprocess("-p", "pytest_cpu_time", "-p", "no:cacheprovider",
                                           f"--rootdir={pytester.path}")
    result.assert_outcomes(passed=2)
    rows = {row[0]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"test_inner.py::test_child", "test_inner.py::test_nothing"}
    assert rows["test_inner.py::test_child"][1] >= 0.5 > rows["test_inner.py::test_nothing"][1]
    result.stdout.fnmatch_lines(["*CPU seconds by module*", "*CPU s*2 tests  test_inner.py"])
