"""Prepare prometheus-client's multiprocess mode. Import-light on purpose: it must run before
anything imports prometheus_client, which decides its storage mode at import time."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> Path:
    """A metrics directory of this process (and the job processes it forks), under the configured one.

    Several services may share PROMETHEUS_MULTIPROC_DIR (local runs, tests); each gets its own
    subdirectory, so one starting up never clears another's live files. Directories left by
    processes that are gone are removed."""
    base = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="feedrank-metrics-"))
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob("pid-*"):
        if not _alive(int(stale.name.removeprefix("pid-"))):
            shutil.rmtree(stale, ignore_errors=True)
    directory = base / f"pid-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
