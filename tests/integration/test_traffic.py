"""The traffic simulator against a running ranker and ingest, over real HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest

from services.ingest.app import create_app as ingest_app
from services.ranker.app import create_app as ranker_app
from services.traffic.simulator import TrafficSimulator, engagements
from shared.clock import AcceleratedClock, FixedClock
from shared.connections import lake
from shared.world import World
from tests.integration.conftest import TrainedWorld
from tests.support import serve_app

pytestmark = pytest.mark.integration


def test_engagements_follow_the_ground_truth(trained_world: TrainedWorld) -> None:
    config = trained_world.settings.data_config()
    world = World.create(config)
    rng = np.random.default_rng(0)
    now = FixedClock(int(world.item_published_ms.max())).now_ms()
    clicks = np.zeros(10)
    for _ in range(3000):
        events = engagements(world, 5, list(range(10)), "r", now, rng)
        for e in events:
            if e["event_type"] == "click":
                clicks[e["position"]] += 1
                assert e["ts"] > now  # a click comes after its impression
                assert e["dwell_ms"] >= 0
    expected = 3000 * world.click_probability(np.full(10, 5), np.arange(10), np.arange(10), np.full(10, now))
    assert np.all(np.abs(clicks - expected) < 5 * np.sqrt(expected) + 5)


def test_simulated_users_rank_click_and_report(trained_world: TrainedWorld) -> None:
    settings = trained_world.settings
    data = settings.data_config()
    traffic = settings.serving_config().traffic
    with serve_app(ingest_app(settings)) as ingest_url, serve_app(ranker_app(settings)) as ranker_url:
        deadline = time.monotonic() + 30
        while httpx.get(f"{ranker_url}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        clock = AcceleratedClock.shared(trained_world.queue, data)
        started_ms = clock.now_ms()
        simulator = TrafficSimulator(World.create(data), clock, traffic, ranker_url, ingest_url, seed=1)
        stats = asyncio.run(simulator.run(duration_s=3.0))
    assert simulator.base_rate > 0
    assert stats.requests >= 0.7 * simulator.base_rate * 3
    assert stats.failed_requests == 0
    assert stats.events_rejected == 0
    assert stats.clicks > 0
    assert set(stats.by_variant) == {"champion"}
    # The generated history ends at live_start, where this test's clock may start: its last
    # impressions are older than started_ms, and its late clicks belong to requests served then.
    events = lake(settings).read_events(started_ms, clock.now_ms() + 10**9)
    impressions = events.filter(pc.equal(events["event_type"], "impression"))
    assert impressions.num_rows == stats.impressions
    served_now = pc.is_in(events["request_id"], value_set=pc.unique(impressions["request_id"]))
    clicks = events.filter(pc.and_(pc.equal(events["event_type"], "click"), served_now))
    assert clicks.num_rows == stats.clicks
