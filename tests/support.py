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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _without_reaper_if_unavailable() -> None:
    """Ryuk (testcontainers' reaper) needs an image from a registry; where it cannot be had, run
    without it (containers are stopped by our context managers anyway)."""
    import docker

    if not docker.from_env().images.list(name="testcontainers/ryuk"):
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


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
def private_redis(prefer_binary: bool = False) -> Iterator[str]:
    """redis://host:port of a Redis nobody else uses: FEEDRANK_TEST_REDIS_URL, else a container,
    else a redis-server binary. Raises NoRedisError (with what to do) when none is possible.

    Benchmarks prefer a native redis-server when there is one: a container's port proxy adds its
    own latency and CPU to every round trip, which is not the ranker's."""
    if explicit := os.environ.get("FEEDRANK_TEST_REDIS_URL"):
        yield explicit.rstrip("/").rsplit("/", 1)[0] if explicit.count("/") > 2 else explicit.rstrip("/")
        return
    if docker_available() and not (prefer_binary and shutil.which("redis-server")):
        _without_reaper_if_unavailable()
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
        [
            sys.executable,
            "-m",
            "services.feature",
            "worker",
            "--burst",
            "--queues",
            *queues,
        ],  # any worker CLI will do
        cwd=REPO_ROOT,
        env={**os.environ, **service_env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


class StoppableRedis:
    """A Redis a test may stop and start again on the same port, keeping its data (AOF on)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._container: object | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="feedrank-redis-stoppable-")
        self._docker = docker_available() and not os.environ.get("FEEDRANK_TEST_REDIS_URL")
        if not self._docker and not shutil.which("redis-server"):
            raise NoRedisError(NO_REDIS)

    def start(self) -> None:
        if self._docker:
            import docker

            client = docker.from_env()
            if self._container is None:
                self._container = client.containers.run(
                    REDIS_IMAGE, command=["redis-server", "--appendonly", "yes", "--appendfsync", "always"],
                    ports={"6379/tcp": ("127.0.0.1", self.port)}, detach=True, remove=False,
                )  # fmt: skip
            else:
                self._container.start()  # type: ignore[attr-defined]
        else:
            self._process = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", self._dir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        wait_for_redis(self.url)

    def stop(self) -> None:
        if self._docker and self._container is not None:
            self._container.stop(timeout=2)  # type: ignore[attr-defined]
        elif self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def remove(self) -> None:
        self.stop()
        if self._docker and self._container is not None:
            self._container.remove(force=True)  # type: ignore[attr-defined]
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def serve_app(app: Any, port: int | None = None) -> Iterator[str]:
    """Run an ASGI app on a real socket (uvicorn in a thread); yields its base URL."""
    import threading

    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@dataclass(frozen=True)
class TrainedWorld:
    """A tiny world after etl and train: lake, online store, MLflow store with a champion."""

    env: dict[str, str]
    settings: Any  # shared.settings.Settings
    queue: Redis
    store: Redis
    root: Path


@contextmanager
def build_trained_world(
    redis_base_url: str, root: Path, queue_db: int, store_db: int
) -> Iterator[TrainedWorld]:
    """Run etl + train of the tiny world through a real RQ worker; the environment points at it
    while the context is open (databases `queue_db` and `store_db` of the test Redis, flushed)."""
    import pytest

    from shared.dags import submit_etl_then_train
    from shared.pipeline import PipelineRunner
    from shared.settings import get_settings

    env = {
        "FEEDRANK_QUEUE_URL": f"{redis_base_url}/{queue_db}",
        "FEEDRANK_FEATURE_STORE_URL": f"{redis_base_url}/{store_db}",
        "FEEDRANK_LAKE_PATH": str(root / "lake"),
        "FEEDRANK_PROFILE": "tiny",
        "FEEDRANK_LOG_FORMAT": "console",
        "FEEDRANK_LOG_LEVEL": "WARNING",
        "FEEDRANK_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow/mlflow.db",
        "FEEDRANK_MODEL_CACHE_DIR": str(root / "model-cache"),
        "FEEDRANK_ADMIN_TOKEN": "test-admin-token",
        "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),
    }
    queue, store = (
        Redis.from_url(env["FEEDRANK_QUEUE_URL"]),
        Redis.from_url(env["FEEDRANK_FEATURE_STORE_URL"]),
    )
    for conn in (queue, store):
        conn.flushdb()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            if key != "PROMETHEUS_MULTIPROC_DIR":
                patch.setenv(key, value)
        get_settings.cache_clear()
        settings = get_settings()
        data, model = settings.data_config(), settings.ranking_model_config()
        chain = submit_etl_then_train(queue, data, model, "simulate")
        assert chain is not None
        result = run_worker(env, ["ingest", "features", "training"])
        assert result.returncode == 0, result.stderr[-3000:]
        view = PipelineRunner(queue, model.pipeline).run(chain[1])
        assert view is not None
        assert view.status == "finished", [(s.name, s.status, s.error) for s in view.steps]
        try:
            yield TrainedWorld(env, settings, queue, store, root)
        finally:
            get_settings.cache_clear()
    for conn in (queue, store):
        conn.flushdb()
