"""OpenMP threads sleep at barriers by default (umarvel/__init__.py): spinning ones made a tiny
training step 50x slower next to other busy processes (scripts/bench_threads.py); run.cpu_threads
sets torch's intra-op threads for every command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOW_POLICY = "import umarvel, os; print(os.environ['OMP_WAIT_POLICY'])"


def _policy_after_import(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", SHOW_POLICY], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_importing_umarvel_makes_openmp_wait_passively():
    assert _policy_after_import() == "PASSIVE"


def test_a_wait_policy_the_user_set_wins():
    assert _policy_after_import(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


SHOW_THREADS = ("import sys, torch; from umarvel.config import load_config; before = torch.get_num_threads(); "
                "load_config(sys.argv[1] or None, sys.argv[2:]); print(before, torch.get_num_threads())")


def _threads_before_and_after_load(config: str, *overrides: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", SHOW_THREADS, config, *overrides], capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return [int(n) for n in done.stdout.split()]


def test_run_cpu_threads_sets_torch_threads_when_a_command_loads_its_config():
    assert _threads_before_and_after_load("", "run.cpu_threads=1") == [2, 1]
    assert _threads_before_and_after_load("", "run.cpu_threads=3") == [2, 3]


def test_cpu_threads_0_keeps_torch_default_and_the_tiny_configs_use_one_thread():
    assert _threads_before_and_after_load("") == [2, 2]
    assert _threads_before_and_after_load(str(ROOT / "configs" / "tiny" / "hardneg.yaml")) == [2, 1]
