"""The impression log loses nothing to trimming or to a drain that goes away: the stream is
trimmed only below what the drain acknowledged, entries a dead consumer left pending are claimed,
and how far the drain is behind is exported."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client import generate_latest

from services.ingest.served import ServedDrain
from shared import keys
from shared.config import load_data_config
from shared.lake import Lake
from shared.settings import REPO_CONFIG_DIR
from tests.conftest import RedisPair

CONFIG = load_data_config(REPO_CONFIG_DIR, "tiny").ingest.served_drain
NOW_MS = 1_767_420_000_000


def serve_feeds(redis_pair: RedisPair, start: int, n: int) -> None:
    """Served feeds as the ranker's impression log writes them (no length cap)."""
    for i in range(start, start + n):
        redis_pair.queue.xadd(
            keys.SERVED_STREAM,
            {"request_id": f"q{i}", "user_id": str(i), "items": json.dumps([i, i + 1]), "positions": "[0, 1]",
             "scores": "[0.5, 0.4]", "model_version": "1", "variant": "champion", "feature_version": "fv",
             "ts": str(NOW_MS + i), "degraded": "false"},
        )  # fmt: skip


def served_requests(lake: Lake) -> list[str]:
    return sorted(set(lake.read_served(0, 4_102_444_800_000)["request_id"].to_pylist()))


def test_a_dead_consumers_entries_are_claimed_and_only_acknowledged_ones_trimmed(
    redis_pair: RedisPair, tmp_path: Path
) -> None:
    lake = Lake(tmp_path / "lake")
    drain = ServedDrain(redis_pair.queue, lake, CONFIG)
    serve_feeds(redis_pair, 0, 100)
    # a drain container that died after reading 40 feeds, under the hostname it had
    dead = redis_pair.queue.xreadgroup(
        keys.SERVED_GROUP, "old-container", {keys.SERVED_STREAM: ">"}, count=40
    )
    assert len(dead[0][1]) == 40
    serve_feeds(redis_pair, 100, 20)

    written = drain.drain_once()
    backlog = drain.backlog()
    assert written == 80  # everything but the dead consumer's pending entries
    assert backlog.pending == 40
    assert backlog.length == 120  # nothing was trimmed: the oldest entry is still unacknowledged
    assert backlog.oldest_unacked is not None
    assert int(backlog.oldest_unacked.split("-")[0]) > 0

    time.sleep(CONFIG.claim_idle.total_seconds() + 0.2)
    assert drain.drain_once() == 40  # claimed from the dead consumer, written
    backlog = drain.backlog()
    assert (backlog.length, backlog.pending, backlog.lag, backlog.oldest_unacked) == (0, 0, 0, None)
    assert served_requests(lake) == sorted(f"q{i}" for i in range(120))


def test_a_recreated_drain_finds_its_own_pending_entries(redis_pair: RedisPair, tmp_path: Path) -> None:
    """Same stable consumer name after a restart: its pending entries are its own, read at once."""
    lake = Lake(tmp_path / "lake")
    serve_feeds(redis_pair, 0, 30)
    first = ServedDrain(redis_pair.queue, lake, CONFIG)
    redis_pair.queue.xreadgroup(keys.SERVED_GROUP, first.consumer, {keys.SERVED_STREAM: ">"}, count=30)
    # ... and the container is replaced before it wrote anything
    second = ServedDrain(redis_pair.queue, lake, CONFIG)
    assert second.consumer == first.consumer == CONFIG.consumer
    assert second.drain_once() == 30
    assert served_requests(lake) == sorted(f"q{i}" for i in range(30))
    assert redis_pair.queue.xlen(keys.SERVED_STREAM) == 0


def test_the_lag_is_exported(redis_pair: RedisPair, tmp_path: Path) -> None:
    drain = ServedDrain(redis_pair.queue, Lake(tmp_path / "lake"), CONFIG)
    serve_feeds(redis_pair, 0, 10)
    behind = drain.observe(every_s=0)
    assert behind is not None
    assert (behind.length, behind.lag) == (10, 10)
    text = generate_latest().decode()
    assert "feedrank_served_stream_lag 10.0" in text
    assert "feedrank_served_stream_oldest_unacked_seconds" in text
    drain.drain_once()
    caught_up = drain.observe(every_s=0)
    assert caught_up is not None
    assert caught_up.oldest_unacked is None
    assert "feedrank_served_stream_oldest_unacked_seconds 0.0" in generate_latest().decode()
