"""The impression log: every served feed goes to a Redis stream that ingest drains into the lake.

A request only puts its record on an in-memory queue (no I/O); a background thread writes batches
with one pipeline per batch. If Redis is away the thread keeps retrying with the records in hand;
if the queue is full the record is dropped and counted. Logging never blocks or fails a request.

The stream is not capped here: a length cap would trim entries the drain has not written to the
lake yet. The drain trims what it acknowledged; the queue Redis' maxmemory (noeviction) bounds the
rest, and the drain's lag metric alerts long before that.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog
from redis import Redis

from shared import keys
from shared.config import ImpressionLogConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ServedFeed:
    request_id: str
    user_id: int
    items: list[int]
    positions: list[int]
    scores: list[float]
    model_version: int | None
    variant: str
    feature_version: str
    ts: int  # sim time, ms
    degraded: bool

    def fields(self) -> dict[str, str]:
        record = asdict(self)
        return {
            k: json.dumps(v) if isinstance(v, list | bool) or v is None else str(v) for k, v in record.items()
        }


class ImpressionLog:
    def __init__(
        self,
        conn: Redis,
        config: ImpressionLogConfig,
        on_drop: Callable[[], None],
        on_write: Callable[[int], None],
    ) -> None:
        self.conn = conn
        self.config = config
        self._queue: queue.Queue[ServedFeed] = queue.Queue(maxsize=config.queue_size)
        self._on_drop = on_drop
        self._on_write = on_write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, feed: ServedFeed) -> None:
        try:
            self._queue.put_nowait(feed)
        except queue.Full:
            self._on_drop()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _write(self, batch: list[ServedFeed]) -> None:
        with self.conn.pipeline(transaction=False) as pipe:
            for feed in batch:
                pipe.xadd(keys.SERVED_STREAM, feed.fields())
            pipe.execute()
        self._on_write(len(batch))

    def _drain(self) -> None:
        """Block for the first record, then take whatever else is queued (up to a batch) without
        waiting: no polling, so this thread costs the request path nothing while traffic is quiet."""
        batch: list[ServedFeed] = []
        wait = self.config.flush_every.total_seconds()
        while not (self._stop.is_set() and self._queue.empty() and not batch):
            if not batch:
                try:
                    batch.append(self._queue.get(timeout=wait))
                except queue.Empty:
                    continue
            while len(batch) < self.config.batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
                batch = []
            except Exception as exc:
                log.warning("impression_log_retry", error=str(exc), pending=len(batch) + self.pending)
                self._stop.wait(wait)
                if self._stop.is_set():
                    break

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drain, name="impression-log", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (best effort within the timeout), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
