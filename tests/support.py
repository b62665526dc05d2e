"""Helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_worker(
    service_env: dict[str, str], queues: list[str], timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """A real RQ worker in its own process, in burst mode: it works until the queues are empty."""
    env = {**os.environ, **service_env}
    return subprocess.run(
        [sys.executable, "-m", "services.feature", "worker", "--burst", "--queues", *queues],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
