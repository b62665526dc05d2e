"""Helpers shared by tests and benchmarks (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis import Redis

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_IMAGE = "redis:7.2-alpine"

NO_REDIS = (
    "These tests need a Redis of their own and found none: set FEEDRANK_TEST_REDIS_URL to a Redis "
    f"dedicated to tests, or make Docker available with the image {REDIS_IMAGE} "
    '(CI: eval "$(../shared/ci/docker-env.sh redis:7.2-alpine)"), or put redis-server on PATH.'
)


class NoRedisError(RuntimeError):
    pass


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        return bool(client.images.list(name=REDIS_IMAGE))
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_redis(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            Redis.from_url(url).ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextmanager
def private_redis() -> Iterator[str]:
    """redis://host:port of a Redis nobody else uses: FEEDRANK_TEST_REDIS_URL, else a container,
    else a redis-server binary. Raises NoRedisError (with what to do) when none is possible."""
    if explicit := os.environ.get("FEEDRANK_TEST_REDIS_URL"):
        yield explicit.rstrip("/").rsplit("/", 1)[0] if explicit.count("/") > 2 else explicit.rstrip("/")
        return
    if docker_available():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(REDIS_IMAGE) as container:
            url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}"
            wait_for_redis(url)
            yield url
        return
    if binary := shutil.which("redis-server"):
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="feedrank-redis-")
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [*args, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"redis://127.0.0.1:{port}"
        try:
            wait_for_redis(url)
            yield url
        finally:
            process.terminate()
            process.wait(10)
            shutil.rmtree(workdir, ignore_errors=True)
        return
    raise NoRedisError(NO_REDIS)


def run_worker(
    service_env: dict[str, str], queues: list[str], timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """A real RQ worker in its own process, in burst mode: it works until the queues are empty."""
    return subprocess.run(
        [sys.executable, "-m", "services.feature", "worker", "--burst", "--queues", *queues],
        cwd=REPO_ROOT,
        env={**os.environ, **service_env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
