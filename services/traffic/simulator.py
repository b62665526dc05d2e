"""Live traffic: simulated users ask the ranker for feeds and react to what they are shown.

At the world's own session rate (the rate its history was generated at, sped up by the clock; or
a fixed rate given for load), a user chosen by activity requests a feed from the ranker; the
world's ground truth decides, for the positions actually served, what the user saw, clicked, liked
and hid. Impressions are posted to ingest at once; engagements are held until their own timestamp
has passed on the world clock (a click comes seconds after the impression, a like after the
dwell), which is what makes labels arrive late, as in production. New catalog items are published
as the world clock reaches their publish time. This is what gives every model its online click
rate.

Every batch of events carries an Idempotency-Key and is resent as it was (same key, same body)
until ingest answers it, so an ingest that crashed or had a full disk mid-batch loses nothing and
stores nothing twice.
"""

from __future__ import annotations

import asyncio
import heapq
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import structlog
from redis import Redis

from shared.clock import Clock
from shared.config import TrafficSimConfig
from shared.schemas import EventType
from shared.timeutil import duration_ms, iso
from shared.world import World
from shared.world.runtime import drift_overrides, with_overrides

log = structlog.get_logger(__name__)

_CODES = {EventType.IMPRESSION: "i", EventType.CLICK: "c", EventType.LIKE: "l", EventType.HIDE: "h"}


@dataclass
class Stats:
    requests: int = 0
    failed_requests: int = 0
    degraded: int = 0
    impressions: int = 0
    clicks: int = 0
    events_posted: int = 0
    events_duplicates: int = 0
    events_rejected: int = 0
    events_resent: int = 0  # batches sent again after a failure (same key, same body)
    items_published: int = 0
    by_variant: dict[str, list[int]] = field(default_factory=dict)  # variant -> [impressions, clicks]


def engagements(
    world: World, user: int, items: list[int], request_id: str, now_ms: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Events for one served feed: impressions now, engagements at their own (later) times."""
    if not items:
        return []
    cm = world.config.click_model
    n = len(items)
    users = np.full(n, user)
    item_ids = np.asarray(items, dtype=np.int64)
    positions = np.arange(n)
    ts = np.full(n, now_ms)
    known = (item_ids >= 0) & (item_ids < world.n_items)
    safe_items = np.where(known, item_ids, 0)
    examined = rng.random(n) < world.examination(positions)
    logit = world.relevance_logit(users, safe_items, ts)
    clicked = known & examined & (rng.random(n) < 1.0 / (1.0 + np.exp(-logit)))
    events: list[dict[str, Any]] = []

    def event(kind: EventType, p: int, at: int, **extra: Any) -> dict[str, Any]:
        return {
            "event_id": f"{request_id}-{p}-{_CODES[kind]}",
            "event_type": kind.value,
            "user_id": user,
            "item_id": int(item_ids[p]),
            "request_id": request_id,
            "position": p,
            "ts": int(at),
            **extra,
        }

    delay_ms = duration_ms(cm.click_delay_mean)
    max_dwell = duration_ms(world.config.validation.max_dwell)
    like_p = world.like_probability(users, safe_items, ts)
    hide_p = world.hide_probability(users, safe_items, ts)
    for p in range(n):
        events.append(event(EventType.IMPRESSION, p, now_ms))
        if clicked[p]:
            click_at = now_ms + 1 + int(rng.exponential(delay_ms))
            dwell = int(
                min(
                    rng.lognormal(
                        cm.dwell_log_mean + cm.dwell_relevance_weight * (logit[p] - cm.base_logit),
                        cm.dwell_log_sd,
                    )
                    * 1000,
                    max_dwell,
                )
            )
            events.append(event(EventType.CLICK, p, click_at, dwell_ms=dwell))
            if rng.random() < like_p[p]:
                events.append(event(EventType.LIKE, p, click_at + dwell))
        elif known[p] and examined[p] and rng.random() < hide_p[p]:
            events.append(event(EventType.HIDE, p, now_ms + 1 + int(rng.exponential(delay_ms))))
    return events


class TrafficSimulator:
    def __init__(
        self,
        world: World,
        clock: Clock,
        config: TrafficSimConfig,
        ranker_url: str,
        ingest_url: str,
        seed: int = 0,
        drift_source: Redis | None = None,
    ) -> None:
        self.world = world
        self._base_config = world.config
        self._drift_source = drift_source
        self._drift: dict[str, Any] = {}
        self.clock = clock
        self.config = config
        self.k = config.k or world.config.traffic.feed_size
        self.base_rate = config.rate or self.world_session_rate(world, clock)
        self.ranker_url = ranker_url.rstrip("/")
        self.ingest_url = ingest_url.rstrip("/")
        self.rng = np.random.default_rng(seed)
        self.stats = Stats()
        self._pending: list[tuple[int, int, dict[str, Any]]] = []  # (ts, tiebreak, event) heap
        self._unsent: list[tuple[str, list[dict[str, Any]]]] = []  # (Idempotency-Key, events) to resend
        self._tiebreak = 0
        self._published_until = int(clock.now_ms())

    @staticmethod
    def world_session_rate(world: World, clock: Clock) -> float:
        """Sessions per wall second that the simulated users start on their own: the rate at which
        the history was generated, sped up by the clock. Live traffic at this rate has the same
        volume per simulated hour as the training data, so the monitor sees no artificial drift."""
        users = world.active_users(clock.now_ms())
        per_sim_second = float(world.user_activity[users].sum()) / 86_400
        return per_sim_second * float(getattr(clock, "speedup", 1.0))

    def current_rate(self, now_ms: int) -> float:
        """The base rate, following the world's daily cycle when the config asks for one (fixed
        rates from --rate are load, not users, and stay flat)."""
        if self.config.rate is not None:
            return self.base_rate
        return self.base_rate * self.world.diurnal_factor(now_ms)

    def pick_user(self, now_ms: int) -> int:
        users = self.world.active_users(now_ms)
        weights = self.world.user_activity[users]
        return int(self.rng.choice(users, p=weights / weights.sum()))

    def _hold(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._tiebreak += 1
            heapq.heappush(self._pending, (event["ts"], self._tiebreak, event))

    def due_events(self, now_ms: int) -> list[dict[str, Any]]:
        due = []
        while self._pending and self._pending[0][0] <= now_ms:
            due.append(heapq.heappop(self._pending)[2])
        return due

    async def request_feed(self, client: httpx.AsyncClient) -> None:
        now = self.clock.now_ms()
        user = self.pick_user(now)
        try:
            response = await client.post(f"{self.ranker_url}/rank", json={"user_id": user, "k": self.k})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.stats.failed_requests += 1
            log.warning("rank_failed", error=repr(exc))
            return
        feed = response.json()
        items = [entry["item_id"] for entry in feed["items"]]
        events = engagements(self.world, user, items, feed["request_id"], now, self.rng)
        self.stats.requests += 1
        self.stats.degraded += int(feed["degraded"])
        clicks = sum(1 for e in events if e["event_type"] == EventType.CLICK.value)
        self.stats.impressions += len(items)
        self.stats.clicks += clicks
        counts = self.stats.by_variant.setdefault(feed["variant"], [0, 0])
        counts[0] += len(items)
        counts[1] += clicks
        self._hold(events)

    async def flush(self, client: httpx.AsyncClient, everything: bool = False) -> None:
        """Post due events in keyed batches; batches that failed before are resent first, unchanged."""
        due = self.due_events(2**62 if everything else self.clock.now_ms())
        size = self.config.events_batch
        batches = self._unsent + [(uuid.uuid4().hex, due[lo : lo + size]) for lo in range(0, len(due), size)]
        self.stats.events_resent += len(self._unsent)
        self._unsent = []
        for key, batch in batches:
            if not await self.post_events(client, key, batch):
                self._unsent.append((key, batch))

    async def post_events(self, client: httpx.AsyncClient, key: str, batch: list[dict[str, Any]]) -> bool:
        """One keyed batch; False when it must be resent (ingest away, busy, or failed mid-batch)."""
        try:
            response = await client.post(
                f"{self.ingest_url}/events", json=batch, headers={"Idempotency-Key": key}
            )
        except httpx.HTTPError as exc:
            log.warning("events_post_failed", error=repr(exc), events=len(batch))
            return False
        code = response.status_code
        if code in (200, 422):
            report = response.json()
            self.stats.events_posted += int(report.get("stored", 0))
            self.stats.events_duplicates += int(report.get("duplicates", 0))
            self.stats.events_rejected += int(report.get("quarantined", 0))
            return True
        if code >= 500 or code in (408, 429) or (code == 409 and "Retry-After" in response.headers):
            log.warning("events_post_retry", status=code, events=len(batch), detail=response.text[:200])
            return False
        log.error("events_post_refused", status=code, events=len(batch), detail=response.text[:200])
        self.stats.events_rejected += len(batch)  # a refusal that resending cannot change
        return True

    def follow_drift(self) -> None:
        """Pick up drift injected at run time (python -m services.traffic inject-drift)."""
        if self._drift_source is None:
            return
        overrides = drift_overrides(self._drift_source)
        if overrides != self._drift:
            self._drift = overrides
            self.world = World.create(with_overrides(self._base_config, overrides))
            log.info("world_drift_changed", drift=overrides)

    async def publish_catalog(self, client: httpx.AsyncClient) -> None:
        self.follow_drift()
        now = self.clock.now_ms()
        fresh = np.flatnonzero(
            (self.world.item_published_ms > self._published_until) & (self.world.item_published_ms <= now)
        )
        if fresh.size:
            items = [
                {
                    "item_id": int(i),
                    "creator_id": int(self.world.item_creator[i]),
                    "topic_id": int(self.world.item_topic[i]),
                    "published_at": int(self.world.item_published_ms[i]),
                }
                for i in fresh
            ]
            try:
                response = await client.post(f"{self.ingest_url}/items", json=items)
                response.raise_for_status()
                self.stats.items_published += len(items)
            except httpx.HTTPError as exc:
                log.warning("catalog_post_failed", error=repr(exc))
                return
        self._published_until = now

    async def run(self, duration_s: float | None = None) -> Stats:
        """Fixed-rate requests (with at most `concurrency` in flight) until the duration passes."""
        limiter = asyncio.Semaphore(self.config.concurrency)
        started = time.monotonic()
        last_flush = last_catalog = 0.0
        tasks: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(timeout=10.0) as client:
            await self.publish_catalog(client)
            next_at = time.monotonic()
            while duration_s is None or time.monotonic() - started < duration_s:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += 1.0 / self.current_rate(self.clock.now_ms())

                async def one() -> None:
                    async with limiter:
                        await self.request_feed(client)

                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                now = time.monotonic()
                if now - last_flush >= self.config.flush_every.total_seconds():
                    last_flush = now
                    await self.flush(client)
                if now - last_catalog >= self.config.catalog_every.total_seconds():
                    last_catalog = now
                    await self.publish_catalog(client)
                if self.stats.requests and self.stats.requests % 500 == 0:
                    self.log_progress()
            if tasks:
                await asyncio.gather(*tasks)
            await self.flush(client, everything=duration_s is not None)
            for _ in range(5):  # a last chance for batches ingest could not take
                if not self._unsent:
                    break
                await asyncio.sleep(1.0)
                await self.flush(client)
        self.log_progress()
        return self.stats

    def log_progress(self) -> None:
        ctr = {v: round(c / max(i, 1), 4) for v, (i, c) in self.stats.by_variant.items()}
        log.info(
            "traffic_progress",
            sim_time=iso(self.clock.now_ms()),
            requests=self.stats.requests,
            failed=self.stats.failed_requests,
            degraded=self.stats.degraded,
            ctr_by_variant=ctr,
            pending_events=len(self._pending),
            unsent_batches=len(self._unsent),
        )
