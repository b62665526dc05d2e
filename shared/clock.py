"""The world's clock. Sim time runs `speedup` times faster than wall time once the world is live.

All services must agree on "now", so the wall-clock anchor (the wall moment at which sim time was
`live_start`) is stored once in the queue Redis with SET NX and read by everyone.
"""

from __future__ import annotations

import time
from typing import Protocol

from redis import Redis

from shared import keys
from shared.config import DataConfig
from shared.timeutil import to_ms


class Clock(Protocol):
    def now_ms(self) -> int: ...


class FixedClock:
    """A clock that only moves when told to: tests, backfills and replays."""

    def __init__(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms


class AcceleratedClock:
    """sim_now = live_start + (wall_now - wall_anchor) * speedup."""

    def __init__(self, live_start_ms: int, speedup: float, wall_anchor_s: float) -> None:
        self.live_start_ms = live_start_ms
        self.speedup = speedup
        self.wall_anchor_s = wall_anchor_s

    def now_ms(self) -> int:
        return self.live_start_ms + int((time.time() - self.wall_anchor_s) * 1000 * self.speedup)

    @classmethod
    def shared(cls, conn: Redis, config: DataConfig) -> AcceleratedClock:
        """The clock every service agrees on: the first caller sets the anchor, later ones read it."""
        conn.set(keys.CLOCK_ANCHOR, repr(time.time()), nx=True)
        anchor = conn.get(keys.CLOCK_ANCHOR)
        assert anchor is not None
        return cls(to_ms(config.live_start), config.clock.speedup, float(anchor))
