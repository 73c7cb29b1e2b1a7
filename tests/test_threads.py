"""OpenMP threads sleep at barriers by default (umarvel/__init__.py): spinning ones made a tiny
training step 50x slower next to other busy processes (scripts/bench_threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys

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
