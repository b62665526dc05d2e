"""Test-side fault injectors at the system's edges: a TCP proxy that delays or stalls a Redis, a
Redis a test may stop, service processes a test may kill, and HAProxy with the gateway's config."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import requests
from redis import Redis

from tests.support import REPO_ROOT, StoppableRedis, free_port

GATEWAY_CFG = REPO_ROOT / "services" / "gateway" / "haproxy.cfg"


class SlowProxy:
    """A TCP proxy in front of a Redis: every chunk a client sends waits `delay_s` before it goes
    on (a Redis that answers, slowly), and `stall()` stops forwarding altogether (a Redis that
    accepts connections and never answers) until `resume()`."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self.held = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if not self._flowing.is_set():
                    self.held += 1  # a command is waiting behind the stall
                self._flowing.wait()
                if delayed and self.delay_s:
                    time.sleep(self.delay_s)
                self._flowing.wait()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._server.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.close()


def copy_redis(source: Redis, target: Redis) -> None:
    """Every key of `source` into `target` (DUMP/RESTORE, TTLs dropped)."""
    for key in source.scan_iter(count=1000):
        target.restore(key, 0, source.dump(key), replace=True)


@contextmanager
def stoppable_copy(source: Redis) -> Iterator[StoppableRedis]:
    """A Redis of the test's own, holding a copy of `source`, that the test may stop and restart."""
    redis = StoppableRedis()
    redis.start()
    copy_redis(source, Redis.from_url(redis.url))
    try:
        yield redis
    finally:
        redis.remove()


class Service:
    """One service as its own process (`python -m services.<name> ...`), killable like in production."""

    def __init__(self, module: str, args: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.module, self.args, self.env, self.log, self.port = module, args, env, log, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_path: str | None = "/healthz", timeout_s: float = 60) -> Service:
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=REPO_ROOT, env={**os.environ, **self.env}, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if wait_path:
            self.wait(wait_path, timeout_s)
        return self

    def wait(self, path: str, timeout_s: float, want: int = 200) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            assert self.process.poll() is None, self.tail()
            try:
                if requests.get(f"{self.url}{path}", timeout=2).status_code == want:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{self.module} not answering {path}:\n{self.tail()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, like a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
        )


def gateway_config(rankers: list[int], port: int, admin_port: int) -> str:
    """services/gateway/haproxy.cfg with static local servers instead of Docker DNS: the same
    frontend rules, limits and health checks, only the addresses differ."""
    text = GATEWAY_CFG.read_text()
    text = re.sub(r"\nresolvers docker\n(?:[ \t]+.*\n)+", "\n", text)
    text = text.replace("    bind :8000\n", f"    bind 127.0.0.1:{port}\n")
    text = text.replace("    bind :8404\n", f"    bind 127.0.0.1:{admin_port}\n")
    text = text.replace(" resolvers docker init-addr none resolve-prefer ipv4", "")
    servers = "".join(f"    server ranker{i} 127.0.0.1:{p}\n" for i, p in enumerate(rankers, 1))
    text, replaced = re.subn(r"    server-template ranker .*\n", servers, text)
    assert replaced == 1, "services/gateway/haproxy.cfg changed shape: no server-template line"
    assert "resolvers" not in text, "services/gateway/haproxy.cfg changed shape: resolvers left"
    return text


OPERATOR = ("operator", "fault-suite-password")
"""The gateway's stats page user (UI_USER, UI_PASSWORD in the stack's .env)."""


class Gateway:
    """HAProxy (the Debian package, as in the gateway image) with `gateway_config`. The rate limit
    per client is the stack's RANK_RATE_LIMIT; tests that send as fast as they can raise it."""

    def __init__(self, rankers: list[int], workdir: Path, rate_limit: int = 1_000_000) -> None:
        self.rate_limit = rate_limit
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(gateway_config(rankers, self.port, self.admin_port))
        self.log = workdir / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Gateway:
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config)],
                stdout=sink,
                stderr=sink,
                env={
                    **os.environ,
                    "RANK_RATE_LIMIT": str(self.rate_limit),
                    "UI_USER": OPERATOR[0],
                    "UI_PASSWORD": OPERATOR[1],
                },
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=1)
                return self
            except requests.RequestException:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.1)

    def servers(self) -> dict[str, str]:
        """Server name -> HAProxy's status of it (UP, DOWN, ...), from the stats CSV."""
        csv = requests.get(
            f"http://127.0.0.1:{self.admin_port}/stats;csv", auth=OPERATOR, timeout=2
        ).text.splitlines()
        header = csv[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in csv[1:] if line]
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == "rankers" and r["svname"].startswith("ranker")
        }

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
