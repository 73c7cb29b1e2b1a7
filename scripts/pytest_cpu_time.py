"""pytest plugin: the CPU seconds each test costs (setup included), a measure that the load of a
shared machine barely changes, unlike wall time: at load 20 a test's wall time is 5-10 times its
CPU time, idle about 1 time (2 threads or 2 ranks can make it less).

Counts this process and the child processes it waited for (launchers, their ranks, DataLoader
workers). Writes one JSON line per test, [test id, CPU s, wall s, load average], to $CPU_TIME_OUT
and prints the modules by CPU seconds at the end.

Usage: PYTHONPATH=scripts CPU_TIME_OUT=cpu.jsonl python -m pytest -q -n 0 -p pytest_cpu_time tests/test_launch.py
(-n 0: in one process, where the summary is printed; under pytest-xdist each worker writes its lines)
"""
from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict

import pytest

_MODULES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.time()
    yield
    row = [item.nodeid, round(_cpu_seconds() - cpu, 2), round(time.time() - wall, 2), os.getloadavg()[0]]
    module = _MODULES[item.nodeid.split("::")[0]]
    module[0] += row[1]
    module[1] += row[2]
    module[2] += 1
    if os.environ.get("CPU_TIME_OUT"):
        with open(os.environ["CPU_TIME_OUT"], "a") as out:
            out.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section("CPU seconds by module (setup included)")
    for name, (cpu, wall, count) in sorted(_MODULES.items(), key=lambda entry: -entry[1][0]):
        terminalreporter.write_line(f"{cpu:8.1f} CPU s {wall:8.1f} wall s {count:5d} tests  {name}")
