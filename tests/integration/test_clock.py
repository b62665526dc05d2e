"""The world clock: every service agrees on "now", which runs `speedup` times faster than wall time."""

from __future__ import annotations

import time

import pytest

from shared.clock import AcceleratedClock
from shared.config import DataConfig
from shared.timeutil import to_ms
from tests.conftest import RedisPair

pytestmark = pytest.mark.integration


def test_all_services_share_one_anchor(redis_pair: RedisPair, tiny_config: DataConfig) -> None:
    first = AcceleratedClock.shared(redis_pair.queue, tiny_config)
    time.sleep(0.05)
    second = AcceleratedClock.shared(redis_pair.queue, tiny_config)
    assert first.wall_anchor_s == second.wall_anchor_s


def test_sim_time_runs_faster_than_wall_time(redis_pair: RedisPair, tiny_config: DataConfig) -> None:
    clock = AcceleratedClock.shared(redis_pair.queue, tiny_config)
    start = clock.now_ms()
    assert start >= to_ms(tiny_config.live_start)
    time.sleep(0.2)
    elapsed_sim_ms = clock.now_ms() - start
    assert elapsed_sim_ms >= 0.2 * 1000 * tiny_config.clock.speedup * 0.9
