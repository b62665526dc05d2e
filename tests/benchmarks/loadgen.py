"""An open-loop HTTP load generator: requests leave on a fixed schedule whether or not earlier ones
have been answered, and each latency is measured from the request's *scheduled* time, so a slow
server cannot hide its queueing delay by slowing the generator down (no coordinated omission).

Raw asyncio sockets with keep-alive HTTP/1.1 and pre-encoded bodies keep the generator's own cost
to tens of microseconds per request; its CPU use is reported so that it can be shown not to be
the bottleneck.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class StepResult:
    rate: float
    sent: int
    ok: int
    errors: int
    latencies_ms: np.ndarray = field(repr=False)
    wall_s: float
    generator_cpu_s: float

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")

    @property
    def achieved_rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def generator_cpu_share(self) -> float:
        """Share of one core the generator used."""
        return self.generator_cpu_s / self.wall_s if self.wall_s else 0.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status


def encode_post(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _run_step(
    url: str, path: str, bodies: list[bytes], rate: float, duration_s: float, max_conns: int, warm_conns: int
) -> StepResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [encode_post(f"{host}:{port}", path, b) for b in bodies]
    # Connections are opened up front and reused first-in first-out, so that load spreads over
    # all of them (and so over every server worker), as it would from many independent clients.
    idle: deque[_Connection] = deque()
    for _ in range(warm_conns):
        idle.append(_Connection(*await asyncio.open_connection(host, port)))
    n = int(rate * duration_s)
    latencies = np.full(n, np.nan)
    errors = 0
    limiter = asyncio.Semaphore(max_conns)

    async def exchange(request: bytes) -> int:
        for attempt in range(2):
            conn = idle.popleft() if idle else _Connection(*await asyncio.open_connection(host, port))
            try:
                status = await conn.exchange(request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn.writer.close()
                if attempt:  # a fresh connection failed too: a real error
                    raise
                continue  # the server closed an idle keep-alive connection: reconnect once
            idle.append(conn)
            return status
        raise AssertionError("unreachable")

    async def fire(i: int, scheduled: float) -> None:
        nonlocal errors
        async with limiter:
            try:
                status = await exchange(requests[i % len(requests)])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                return
            if status == 200:
                latencies[i] = (time.perf_counter() - scheduled) * 1000
            else:
                errors += 1

    cpu_before = time.process_time()
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, scheduled)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    for conn in idle:
        conn.writer.close()
    done = latencies[~np.isnan(latencies)]
    return StepResult(rate, n, int(done.size), errors, done, wall, cpu)


def run_step(
    url: str,
    path: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    max_conns: int = 256,
    warm_conns: int = 32,
) -> StepResult:
    try:
        import uvloop

        return uvloop.run(_run_step(url, path, bodies, rate, duration_s, max_conns, warm_conns))
    except ImportError:  # uvloop comes with uvicorn[standard]; plain asyncio works, a little slower
        return asyncio.run(_run_step(url, path, bodies, rate, duration_s, max_conns, warm_conns))
