"""The OpenMP spin policy dfineseg sets before torch loads (docs/BENCHMARKS.md, "OpenMP wait policy")."""

from __future__ import annotations

import os
import subprocess
import sys


def _spincount(env: dict[str, str]) -> str:
    code = "import dfineseg, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_importing_dfineseg_sets_a_short_spin_unless_the_user_chose_one():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _spincount(env) == "5000"
    assert _spincount({**env, "GOMP_SPINCOUNT": "123"}) == "123"
