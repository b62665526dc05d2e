"""Prepare prometheus-client's multiprocess mode. Import-light on purpose: it must run before
anything imports prometheus_client, which decides its storage mode at import time."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> Path:
    """Use (or create) the metrics directory and clear files left by a previous process."""
    directory = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="feedrank-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory
