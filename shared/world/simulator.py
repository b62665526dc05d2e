"""Session simulator: users arrive, a baseline policy fills their feed, engagements are sampled.

The simulation always starts at world.start and walks forward in fixed chunks with a random
stream per chunk, so the events of any window are identical however the run is split: reruns of
a pipeline step regenerate exactly the same event ids, which ingest then recognises as duplicates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.schemas import EVENT_SCHEMA, EventType
from shared.timeutil import DAY_MS, duration_ms, to_ms
from shared.world.world import World

_TYPE_CODES = {EventType.IMPRESSION: "i", EventType.CLICK: "c", EventType.LIKE: "l", EventType.HIDE: "h"}


@dataclass(frozen=True)
class Feeds:
    """Served feeds of one chunk: request r showed items[r, p] at position p at ts[r]."""

    request_ids: pa.Array  # (R,) string
    users: np.ndarray  # (R,)
    ts: np.ndarray  # (R,) ms
    items: np.ndarray  # (R, k)


@dataclass(frozen=True)
class Chunk:
    start_ms: int
    end_ms: int
    events: pa.Table
    requests: int


class SessionSimulator:
    """Generates the engagement log of the world under the configured baseline policy."""

    def __init__(self, world: World) -> None:
        self.world = world
        traffic = world.config.traffic
        self._chunk_ms = duration_ms(traffic.chunk)
        self._start_ms = to_ms(world.config.world.start)
        self._popularity = np.zeros(world.n_items)
        self._decay = 0.5 ** (self._chunk_ms / duration_ms(traffic.popularity_half_life))

    def run(self, start: datetime, end: datetime) -> Iterator[Chunk]:
        """Yield the chunks that overlap [start, end); earlier chunks are simulated but not emitted."""
        start_ms, end_ms = to_ms(start), to_ms(end)
        if start_ms < self._start_ms:
            raise ValueError("the world does not exist before world.start")
        chunk_start = self._start_ms
        index = 0
        while chunk_start < end_ms:
            chunk_end = chunk_start + self._chunk_ms
            rng = np.random.default_rng([self.world.config.seed, 1, index])
            feeds = self._serve(chunk_start, chunk_end, index, rng)
            events, clicked_items = self._engage(feeds, rng)
            self._popularity *= self._decay
            np.add.at(self._popularity, clicked_items, 1.0)
            if chunk_end > start_ms:
                in_window = pc.and_(
                    pc.greater_equal(events["ts"], pa.scalar(start_ms, EVENT_SCHEMA.field("ts").type)),
                    pc.less(events["ts"], pa.scalar(end_ms, EVENT_SCHEMA.field("ts").type)),
                )
                yield Chunk(chunk_start, chunk_end, events.filter(in_window), len(feeds.users))
            chunk_start, index = chunk_end, index + 1

    # ------------------------------------------------------------------ policy

    def _serve(self, start_ms: int, end_ms: int, index: int, rng: np.random.Generator) -> Feeds:
        world, traffic = self.world, self.world.config.traffic
        users = world.active_users(start_ms)
        rate = world.user_activity[users] * world.diurnal_factor(start_ms) * (end_ms - start_ms) / DAY_MS
        sessions = rng.poisson(rate)
        req_users = np.repeat(users, sessions)
        req_ts = np.sort(rng.integers(start_ms, end_ms, size=req_users.size))
        rng.shuffle(req_users)
        candidates = world.published_items(start_ms, duration_ms(traffic.candidate_max_age))
        k = min(traffic.feed_size, candidates.size)
        n = req_users.size
        if n == 0 or k == 0:
            return Feeds(pa.array([], pa.string()), req_users[:0], req_ts[:0], np.zeros((0, 0), np.int64))
        if traffic.policy == "popularity":
            # Mostly the currently popular items, plus an exploration share drawn from all the
            # others, so that new items get a chance to become popular at all.
            order = np.argsort(-self._popularity[candidates], kind="stable")
            n_explore = round(traffic.candidate_pool * traffic.exploration)
            popular = candidates[order[: traffic.candidate_pool - n_explore]]
            rest = candidates[order[traffic.candidate_pool - n_explore :]]
            explore = rng.choice(rest, size=min(n_explore, rest.size), replace=False)
            pool = np.concatenate([popular, explore])
            weights = self._popularity[popular] + 1.0
            weights = np.concatenate(
                [
                    (1 - traffic.exploration) * weights / weights.sum(),
                    np.full(explore.size, traffic.exploration / max(explore.size, 1)),
                ]
            )
        else:
            pool = candidates
            weights = np.full(pool.size, 1.0 / pool.size)
        k = min(k, pool.size)
        # Gumbel top-k: k draws without replacement per request, in one vectorized step.
        keys = np.log(weights)[None, :] + rng.gumbel(size=(n, pool.size))
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        top_keys = np.take_along_axis(keys, top, axis=1)
        shown = np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)
        prefix = f"s{world.config.seed}c{index}r"
        request_ids = pc.binary_join_element_wise(
            pa.array(np.full(n, prefix)), pc.cast(pa.array(np.arange(n)), pa.string()), ""
        )
        return Feeds(request_ids, req_users, req_ts, pool[shown])

    # ------------------------------------------------------------------ engagement

    def _engage(self, feeds: Feeds, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
        world, cm = self.world, self.world.config.click_model
        n, k = feeds.items.shape
        users = np.repeat(feeds.users, k)
        items = feeds.items.ravel()
        positions = np.tile(np.arange(k, dtype=np.int32), n)
        ts = np.repeat(feeds.ts, k)
        request_ids = pc.take(feeds.request_ids, pa.array(np.repeat(np.arange(n), k)))

        examined = rng.random(users.size) < world.examination(positions)
        logit = world.relevance_logit(users, items, ts)
        clicked = examined & (rng.random(users.size) < 1.0 / (1.0 + np.exp(-logit)))
        click_idx = np.flatnonzero(clicked)
        delay_ms = duration_ms(cm.click_delay_mean)
        click_ts = ts[click_idx] + rng.exponential(delay_ms, click_idx.size).astype(np.int64) + 1
        dwell_s = rng.lognormal(
            cm.dwell_log_mean + cm.dwell_relevance_weight * (logit[click_idx] - cm.base_logit),
            cm.dwell_log_sd,
        )
        dwell_ms = np.minimum(dwell_s * 1000, duration_ms(world.config.validation.max_dwell)).astype(np.int64)
        liked = rng.random(click_idx.size) < world.like_probability(
            users[click_idx], items[click_idx], ts[click_idx]
        )
        like_idx = click_idx[liked]
        like_ts = click_ts[liked] + dwell_ms[liked]
        hide_candidates = np.flatnonzero(examined & ~clicked)
        hidden = rng.random(hide_candidates.size) < world.hide_probability(
            users[hide_candidates], items[hide_candidates], ts[hide_candidates]
        )
        hide_idx = hide_candidates[hidden]
        hide_ts = ts[hide_idx] + rng.exponential(delay_ms, hide_idx.size).astype(np.int64) + 1

        parts = [
            (EventType.IMPRESSION, np.arange(users.size), ts, None),
            (EventType.CLICK, click_idx, click_ts, dwell_ms),
            (EventType.LIKE, like_idx, like_ts, None),
            (EventType.HIDE, hide_idx, hide_ts, None),
        ]
        tables = [
            self._event_rows(kind, idx, t, d, users, items, positions, request_ids)
            for kind, idx, t, d in parts
        ]
        return pa.concat_tables(tables), items[click_idx]

    @staticmethod
    def _event_rows(
        kind: EventType,
        idx: np.ndarray,
        ts: np.ndarray,
        dwell_ms: np.ndarray | None,
        users: np.ndarray,
        items: np.ndarray,
        positions: np.ndarray,
        request_ids: pa.Array,
    ) -> pa.Table:
        req = pc.take(request_ids, pa.array(idx, pa.int64()))
        pos = positions[idx]
        event_ids = pc.binary_join_element_wise(
            req, pc.cast(pa.array(pos), pa.string()), pa.array(np.full(idx.size, _TYPE_CODES[kind])), "-"
        )
        return pa.Table.from_arrays(
            [
                event_ids,
                pa.array(np.full(idx.size, kind.value)),
                pa.array(users[idx]),
                pa.array(items[idx]),
                req,
                pa.array(pos, pa.int32()),
                pa.array(ts, pa.int64()).cast(EVENT_SCHEMA.field("ts").type),
                pa.array(dwell_ms, pa.int64()) if dwell_ms is not None else pa.nulls(idx.size, pa.int64()),
            ],
            schema=EVENT_SCHEMA,
        )
