"""Point-in-time feature computation, vectorized.

The core is `WindowCounter`: events sorted by (key, ts) answer "how many events of key k happened
in [t - w, t)" for a million queries with two binary searches each. The interval is half-open at
t, so an example at time t never sees an event at t or later: in particular not the click that
is its own label, which happens after the impression (see tests/unit/test_point_in_time.py).

The same counters answer the online store's question, "as of T", with one query per entity at T,
so offline and online values are computed by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.features import ENTITY_MEASURES, ITEM_SLOW, TASTE_SPANS, USER_TOPIC_MEASURES, FeatureSpec
from shared.schemas import EventType

_INT63 = 2**62


class QueryPoints:
    """Queries (key, t), sorted once by (key, t): every binary search then walks memory in order,
    which is several times faster than random probes, and one sort serves every counter and window."""

    def __init__(self, keys: np.ndarray, ts: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        self.order = np.lexsort((ts, keys))
        self.keys = keys[self.order]
        self.ts = ts[self.order]

    def unsort(self, values: np.ndarray) -> np.ndarray:
        """Back to the caller's order."""
        out = np.empty_like(values)
        out[self.order] = values
        return out


class WindowCounter:
    """Counts of events per key in trailing half-open windows [t - w, t)."""

    def __init__(self, keys: np.ndarray, ts: np.ndarray, weights: np.ndarray | None = None) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        order = np.lexsort((ts, keys))
        self._keys = keys[order]
        self._ts = ts[order]
        self._groups = np.unique(self._keys)
        self._rank = np.searchsorted(self._groups, self._keys)
        # Weighted counts are differences of a running sum; plain counts are differences of indices.
        self._cumulative = (
            None
            if weights is None
            else np.concatenate([[0.0], np.cumsum(np.asarray(weights, np.float64)[order])])
        )

    def count(self, q_keys: np.ndarray, q_ts: np.ndarray, window_ms: int) -> np.ndarray:
        """Events (or their weights) with key == q_key and q_ts - window_ms <= ts < q_ts, caller's order."""
        points = QueryPoints(q_keys, q_ts)
        return points.unsort(self.counts(points, (window_ms,))[window_ms])

    def counts(self, points: QueryPoints, windows_ms: tuple[int, ...]) -> dict[int, np.ndarray]:
        """Counts for several windows at once, in the points' sorted order."""
        dtype = np.int64 if self._cumulative is None else np.float64
        out = {w: np.zeros(points.keys.size, dtype=dtype) for w in windows_ms}
        if self._keys.size == 0 or points.keys.size == 0:
            return out
        rank = np.searchsorted(self._groups, points.keys)
        present = rank < self._groups.size
        present[present] &= self._groups[rank[present]] == points.keys[present]
        if not present.any():
            return out
        rank, q = rank[present], points.ts[present]
        origin = min(int(self._ts.min()), int(q.min()) - max(windows_ms))
        span = max(int(self._ts.max()), int(q.max())) - origin + 1
        if self._groups.size * span >= _INT63:
            raise OverflowError("time span x number of keys does not fit the composite index")
        # Composite (key rank, ts) keys are sorted like the events, so one searchsorted finds bounds.
        composite = self._rank * span + (self._ts - origin)
        needle = rank * span + (q - origin)
        upper = np.searchsorted(composite, needle, side="left")
        for w in windows_ms:
            lower = np.searchsorted(composite, needle - w, side="left")
            if self._cumulative is None:
                out[w][present] = upper - lower
            else:
                out[w][present] = self._cumulative[upper] - self._cumulative[lower]
        return out


@dataclass(frozen=True)
class EventLog:
    """The event columns the features need, as numpy, with item attributes joined from the catalog."""

    event_type: np.ndarray  # (n,) small int codes, see TYPE_CODE
    user: np.ndarray
    item: np.ndarray
    creator: np.ndarray  # -1 when the item is not in the catalog
    topic: np.ndarray  # -1 when the item is not in the catalog
    ts: np.ndarray
    request: np.ndarray  # int codes of request_id
    position: np.ndarray
    dwell_ms: np.ndarray  # 0 where absent
    request_ids: pa.Array  # dictionary of request codes -> request_id


TYPE_CODE = {t: i for i, t in enumerate(EventType)}


def event_log(events: pa.Table, catalog: pa.Table) -> EventLog:
    """Columns as numpy; catalog attributes looked up by item id (vectorized, sorted search)."""
    type_codes = np.full(events.num_rows, -1, dtype=np.int8)
    types = events["event_type"].to_numpy(zero_copy_only=False)
    for kind, code in TYPE_CODE.items():
        type_codes[types == kind.value] = code
    items = events["item_id"].to_numpy()
    cat_ids = catalog["item_id"].to_numpy()
    order = np.argsort(cat_ids)
    cat_sorted = cat_ids[order]
    pos = np.searchsorted(cat_sorted, items)
    hit = pos < cat_sorted.size
    hit[hit] &= cat_sorted[pos[hit]] == items[hit]
    creator = np.full(items.size, -1, dtype=np.int64)
    topic = np.full(items.size, -1, dtype=np.int64)
    creator[hit] = catalog["creator_id"].to_numpy()[order][pos[hit]]
    topic[hit] = catalog["topic_id"].to_numpy()[order][pos[hit]]
    encoded = pc.dictionary_encode(events["request_id"]).combine_chunks()
    return EventLog(
        event_type=type_codes,
        user=events["user_id"].to_numpy(),
        item=items,
        creator=creator,
        topic=topic,
        ts=events["ts"].cast(pa.int64()).to_numpy(),
        request=encoded.indices.to_numpy().astype(np.int64),
        position=events["position"].to_numpy().astype(np.int64),
        dwell_ms=pc.fill_null(events["dwell_ms"], 0).to_numpy(),
        request_ids=encoded.dictionary,
    )


class Counters:
    """All raw counters of the spec, built once over an event log and queried many times."""

    def __init__(self, spec: FeatureSpec, log: EventLog) -> None:
        self.spec = spec
        imp = log.event_type == TYPE_CODE[EventType.IMPRESSION]
        click = log.event_type == TYPE_CODE[EventType.CLICK]
        like = log.event_type == TYPE_CODE[EventType.LIKE]
        hide = log.event_type == TYPE_CODE[EventType.HIDE]
        masks = {"exposure": imp, "clicks": click}
        exposure = spec.exposure_weight(log.position)
        self._counters: dict[tuple[str, str], WindowCounter] = {}
        for entity, column in (("user", log.user), ("item", log.item), ("creator", log.creator)):
            for measure in ENTITY_MEASURES[entity]:
                m = masks[measure] & (column >= 0)
                weights = exposure[m] if measure == "exposure" else None
                self._counters[(entity, measure)] = WindowCounter(column[m], log.ts[m], weights)
        for measure, m in (("likes", like), ("hides", hide)):
            self._counters[("item", measure)] = WindowCounter(log.item[m], log.ts[m])
        self._user_topic: dict[str, WindowCounter] = {}
        for measure, mask in (*masks.items(), ("hides", hide)):
            m = mask & (log.topic >= 0)
            weights = exposure[m] if measure == "exposure" else None
            self._user_topic[measure] = WindowCounter(
                log.user[m] * spec.n_topics + log.topic[m], log.ts[m], weights
            )

    def entity(
        self, entity: str, measure: str, keys: np.ndarray, ts: np.ndarray, window_ms: int
    ) -> np.ndarray:
        return self._counters[(entity, measure)].count(keys, ts, window_ms)

    def user_topic(
        self, measure: str, users: np.ndarray, topics: np.ndarray, ts: np.ndarray, window_ms: int
    ) -> np.ndarray:
        """A user's clicks, exposure or hides on one topic (per row) over a window."""
        valid = topics >= 0
        out = np.zeros(users.size, dtype=np.float64)
        out[valid] = self._user_topic[measure].count(
            users[valid] * self.spec.n_topics + topics[valid], ts[valid], window_ms
        )
        return out

    def taste_window(self, span: str) -> int:
        return self.spec.recent_taste_window_ms if span == "recent_" else self.spec.long_window_ms

    # ------------------------------------------------------------------ offline: one query per example

    def for_examples(
        self, users: np.ndarray, items: np.ndarray, creators: np.ndarray, topics: np.ndarray, ts: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Raw counters of stage 1 for examples at their own time (strictly before ts)."""
        spec = self.spec
        windows = spec.windows_ms
        long = spec.long_window_ms
        wanted: dict[tuple[str, str], tuple[int, ...]] = {
            (entity, measure): windows for entity in ENTITY_MEASURES for measure in ENTITY_MEASURES[entity]
        }
        for key in (("item", "exposure"), ("item", "clicks"), ("user", "clicks"), ("user", "exposure")):
            wanted[key] = tuple(sorted({*wanted[key], long}))
        wanted[("item", "likes")] = (long,)
        wanted[("item", "hides")] = (long,)
        points = {
            "user": QueryPoints(users, ts),
            "item": QueryPoints(items, ts),
            "creator": QueryPoints(creators, ts),
        }
        counts = {
            key: {
                w: points[key[0]].unsort(c) for w, c in self._counters[key].counts(points[key[0]], ws).items()
            }
            for key, ws in wanted.items()
        }
        raw: dict[str, np.ndarray] = {}
        for entity, measures in ENTITY_MEASURES.items():
            for w in windows:
                for measure in measures:
                    raw[spec.counter(entity, measure, w)] = counts[(entity, measure)][w]
        raw["item_exposure_long"] = counts[("item", "exposure")][long]
        raw["item_clicks_long"] = counts[("item", "clicks")][long]
        raw["item_likes_long"] = counts[("item", "likes")][long]
        raw["item_hides_long"] = counts[("item", "hides")][long]
        raw["user_clicks_long"] = counts[("user", "clicks")][long]
        raw["user_exposure_long"] = counts[("user", "exposure")][long]
        for span in TASTE_SPANS:
            for measure in USER_TOPIC_MEASURES:
                raw[f"user_topic_{span}{measure}"] = self.user_topic(
                    measure, users, topics, ts, self.taste_window(span)
                )
        return raw

    # ------------------------------------------------------------------ online: rows as of one time

    def user_rows(self, users: np.ndarray, as_of_ms: int) -> np.ndarray:
        """Packed user rows in FeatureSpec.user_fields order."""
        spec = self.spec
        ts = np.full(users.size, as_of_ms, dtype=np.int64)
        columns = []
        for name in spec.user_fields:
            if name in ("user_clicks_long", "user_exposure_long"):
                measure = name.split("_")[1]
                columns.append(self.entity("user", measure, users, ts, spec.long_window_ms))
            elif name.startswith("user_topic_"):
                *_, measure, topic = name.split("_")
                span = "recent_" if name.startswith("user_topic_recent_") else ""
                columns.append(
                    self.user_topic(
                        measure, users, np.full(users.size, int(topic)), ts, self.taste_window(span)
                    )
                )
            else:
                _, measure, _ = name.split("_", 2)
                window = spec.windows_ms[
                    [spec.counter("user", measure, w) for w in spec.windows_ms].index(name)
                ]
                columns.append(self.entity("user", measure, users, ts, window))
        return np.column_stack(columns).astype(np.float64) if columns else np.zeros((users.size, 0))

    def item_rows(
        self,
        items: np.ndarray,
        creators: np.ndarray,
        topics: np.ndarray,
        published_ms: np.ndarray,
        as_of_ms: int,
    ) -> np.ndarray:
        """Packed item rows in FeatureSpec.item_fields order (creator counters denormalised)."""
        spec = self.spec
        ts = np.full(items.size, as_of_ms, dtype=np.int64)
        by_name: dict[str, np.ndarray] = {
            "creator_id": creators,
            "topic_id": topics,
            "published_at": published_ms,
        }
        for entity, column in (("item", items), ("creator", creators)):
            for w in spec.windows_ms:
                for measure in ENTITY_MEASURES[entity]:
                    by_name[spec.counter(entity, measure, w)] = self.entity(entity, measure, column, ts, w)
        for name in ITEM_SLOW:
            measure = name.split("_")[1]
            by_name[name] = self.entity("item", measure, items, ts, spec.long_window_ms)
        return np.column_stack([by_name[name] for name in spec.item_fields]).astype(np.float64)


def snapshot_rows(
    spec: FeatureSpec, events: pa.Table, catalog: pa.Table, as_of_ms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The online store's rows as of `as_of_ms`: (user ids, user rows, item ids, item rows) of the
    users in `events` and every item of `catalog`, by the counters the training sets use."""
    counters = Counters(spec, event_log(events, catalog))
    users = np.unique(events["user_id"].to_numpy()) if events.num_rows else np.zeros(0, np.int64)
    items = catalog["item_id"].to_numpy()
    item_rows = counters.item_rows(
        items,
        catalog["creator_id"].to_numpy(),
        catalog["topic_id"].to_numpy(),
        catalog["published_at"].cast(pa.int64()).to_numpy(),
        as_of_ms,
    )
    return users, counters.user_rows(users, as_of_ms), items, item_rows
