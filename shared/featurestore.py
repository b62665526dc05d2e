"""The online feature store on Redis, laid out for the ranker's read path.

A snapshot of one feature version is two hashes, users and items, whose values are packed float64
rows (layouts: FeatureSpec.user_fields / item_fields). The ranker needs one user and a few hundred
items per request, so one pipelined round trip reads the user row (HGET), every item row (one
HMGET), the user's engaged items and the version's snapshot pointer. Packed rows turn into a numpy
matrix with one `frombuffer`, with no per-field parsing.

Snapshots are immutable: a new one is written under its own id, then the per-version pointer is
moved atomically (never backwards in time), and the superseded snapshot expires after a grace
period. A reader addresses rows by the snapshot id it learned from the pointer on its previous
read, so every row of a request comes from one snapshot, never two; when the pointer moves, the
next request follows it (the old snapshot is still there during the grace period). Items newer
than the snapshot fall back to the catalog, a second round trip only when there are such items.
(A Lua script could read pointer and rows atomically, but measured twice as slow: 0.6 ms against
0.3 ms for 200 items.) Every key carries a TTL, so an abandoned version cleans itself up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from redis import Redis

from shared import keys
from shared.features import FeatureSpec

CATALOG_FIELDS = ("creator_id", "topic_id", "published_at")
"""Layout of a packed catalog row."""

_SWAP = """
local current = redis.call('GET', KEYS[1])
if current and current > ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[1])
return current
"""


def pack(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=np.float64).tobytes()


def pack_catalog(creator_id: int, topic_id: int, published_at_ms: int) -> bytes:
    return pack(np.array([creator_id, topic_id, published_at_ms], dtype=np.float64))


def snapshot_id_for(as_of_ms: int) -> str:
    """Zero-padded as-of time: ids sort like time, which the pointer swap relies on."""
    return f"{as_of_ms:015d}"


@dataclass(frozen=True)
class Snapshot:
    feature_version: str
    snapshot_id: str
    as_of_ms: int
    users: int
    items: int


@dataclass(frozen=True)
class Fetched:
    """Rows for one request. Missing users/items are zero rows (no history) with found=False.
    `snapshot_id` is None when there is no usable snapshot (none published, pointer lost, or its
    hashes evicted): the rows are zeros then and must not be scored as if they were features."""

    snapshot_id: str | None
    user: np.ndarray  # (len(user_fields),)
    user_found: bool
    items: np.ndarray  # (n, len(item_fields))
    item_found: np.ndarray  # (n,) bool: row from the snapshot
    item_known: np.ndarray  # (n,) bool: from the snapshot or the catalog
    engaged: frozenset[int] = frozenset()  # items the user already clicked, liked or hid


class FeatureStore:
    def __init__(
        self, conn: Redis, ttl: timedelta, superseded_ttl: timedelta, write_chunk: int = 5000
    ) -> None:
        self.conn = conn
        self.ttl_s = max(1, int(ttl.total_seconds()))
        self.superseded_ttl_s = max(1, int(superseded_ttl.total_seconds()))
        self.write_chunk = write_chunk
        self._snapshot: dict[str, str] = {}  # feature version -> snapshot id last seen on the pointer
        self._swap = conn.register_script(_SWAP)

    # ------------------------------------------------------------------ write

    def publish(
        self,
        spec: FeatureSpec,
        as_of_ms: int,
        user_ids: np.ndarray,
        user_rows: np.ndarray,
        item_ids: np.ndarray,
        item_rows: np.ndarray,
    ) -> Snapshot:
        """Write a complete snapshot, then point readers at it (unless a newer one is live)."""
        if user_rows.shape != (user_ids.size, len(spec.user_fields)):
            raise ValueError(f"user rows must be ({user_ids.size}, {len(spec.user_fields)})")
        if item_rows.shape != (item_ids.size, len(spec.item_fields)):
            raise ValueError(f"item rows must be ({item_ids.size}, {len(spec.item_fields)})")
        fv, sid = spec.version, snapshot_id_for(as_of_ms)
        users_key, items_key = keys.features_users(fv, sid), keys.features_items(fv, sid)
        meta = {
            "feature_version": fv,
            "snapshot_id": sid,
            "as_of_ms": as_of_ms,
            "users": int(user_ids.size),
            "items": int(item_ids.size),
            "user_fields": list(spec.user_fields),
            "item_fields": list(spec.item_fields),
        }
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.delete(users_key, items_key)
            for key, ids, rows in ((users_key, user_ids, user_rows), (items_key, item_ids, item_rows)):
                raw = np.ascontiguousarray(rows, dtype=np.float64)
                for lo in range(0, ids.size, self.write_chunk):
                    chunk = {
                        int(i): raw[j].tobytes() for j, i in enumerate(ids[lo : lo + self.write_chunk], lo)
                    }
                    pipe.hset(key, mapping=chunk)
                pipe.expire(key, self.ttl_s)
            pipe.set(keys.features_meta(fv, sid), json.dumps(meta), ex=self.ttl_s)
            pipe.execute()
        previous = self._swap(keys=[keys.features_current(fv)], args=[sid])
        previous = previous.decode() if isinstance(previous, bytes) else previous
        if previous and previous != sid and previous < sid:
            self._expire_snapshot(fv, previous, self.superseded_ttl_s)
        return Snapshot(fv, sid, as_of_ms, int(user_ids.size), int(item_ids.size))

    def _expire_snapshot(self, fv: str, sid: str, ttl_s: int) -> None:
        with self.conn.pipeline(transaction=False) as pipe:
            for key in (
                keys.features_users(fv, sid),
                keys.features_items(fv, sid),
                keys.features_meta(fv, sid),
            ):
                pipe.expire(key, ttl_s)
            pipe.execute()

    # ------------------------------------------------------------------ read

    def current(self, feature_version: str) -> Snapshot | None:
        sid = self.conn.get(keys.features_current(feature_version))
        if sid is None:
            return None
        meta = self.conn.get(keys.features_meta(feature_version, sid.decode()))
        if meta is None:
            return None
        m = json.loads(meta)
        return Snapshot(m["feature_version"], m["snapshot_id"], m["as_of_ms"], m["users"], m["items"])

    def fetch(
        self, spec: FeatureSpec, user_id: int, item_ids: list[int], with_engaged: bool = False
    ) -> Fetched:
        """One round trip: the user's row and every item's row from one snapshot (and, if asked,
        the items the user already engaged with)."""
        fv = spec.version
        sid = self._snapshot.get(fv)
        if sid is None:
            current = self.conn.get(keys.features_current(fv))
            if current is None:
                return self._nothing(
                    spec, len(item_ids), self._engaged(user_id) if with_engaged else frozenset()
                )
            sid = self._snapshot[fv] = current.decode()
        users_key, items_key = keys.features_users(fv, sid), keys.features_items(fv, sid)
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.hget(users_key, user_id)
            if item_ids:
                pipe.hmget(items_key, item_ids)
            if with_engaged:
                pipe.smembers(keys.engaged_items(user_id))
            pipe.get(keys.features_current(fv))
            pipe.exists(users_key, items_key)
            replies = pipe.execute()
        user, rest = replies[0], replies[1:]
        rows: list[bytes | None] = rest.pop(0) if item_ids else []
        engaged = frozenset(int(i) for i in rest.pop(0)) if with_engaged else frozenset()
        pointer, present = rest
        if pointer is None:  # the store lost its pointer (restart, flush): there is no snapshot
            self._snapshot.pop(fv, None)
            return self._nothing(spec, len(item_ids), engaged)
        if pointer.decode() != sid:
            self._snapshot[fv] = pointer.decode()  # the next request reads the new snapshot
            if present < 2 or (not user and not any(rows)):  # ours expired already: read the new one now
                return self.fetch(spec, user_id, item_ids, with_engaged)
        if present < 2 and self._evicted(fv, sid, present):
            return self._nothing(spec, len(item_ids), engaged)
        return self._assemble(spec, sid, user, rows, item_ids, engaged)

    def _evicted(self, fv: str, sid: str, present: int) -> bool:
        """A hash of the live snapshot is missing: evicted (or expired) unless the snapshot really
        has no rows of that kind. Without this check its rows would read as zeros, served as healthy."""
        meta = self.conn.get(keys.features_meta(fv, sid))
        if meta is None:
            return True
        counts = json.loads(meta)
        return present < int(counts["users"] > 0) + int(counts["items"] > 0)

    def _engaged(self, user_id: int) -> frozenset[int]:
        return frozenset(int(i) for i in self.conn.smembers(keys.engaged_items(user_id)))

    @staticmethod
    def _nothing(spec: FeatureSpec, n: int, engaged: frozenset[int]) -> Fetched:
        none = np.zeros(n, dtype=bool)
        return Fetched(
            None,
            np.zeros(len(spec.user_fields)),
            False,
            np.zeros((n, len(spec.item_fields))),
            none,
            none,
            engaged,
        )

    def _assemble(
        self,
        spec: FeatureSpec,
        sid: str,
        user: bytes | None,
        rows: list[bytes | None],
        item_ids: list[int],
        engaged: frozenset[int],
    ) -> Fetched:
        n_item, n_catalog = len(spec.item_fields), len(CATALOG_FIELDS)
        n = len(item_ids)
        found = np.fromiter((row is not None for row in rows), dtype=bool, count=n)
        matrix = np.zeros((n, n_item))
        if found.any():
            matrix[found] = np.frombuffer(
                b"".join(r for r in rows if r is not None), dtype=np.float64
            ).reshape(-1, n_item)
        known = found.copy()
        missing = np.flatnonzero(~found)
        if missing.size:
            catalog = self.conn.hmget(keys.CATALOG, [item_ids[i] for i in missing])
            hits = np.fromiter((row is not None for row in catalog), dtype=bool, count=missing.size)
            if hits.any():
                packed = b"".join(r for r in catalog if r is not None)
                matrix[missing[hits], :n_catalog] = np.frombuffer(packed, dtype=np.float64).reshape(
                    -1, n_catalog
                )
                known[missing[hits]] = True
        return Fetched(
            snapshot_id=sid,
            user=np.frombuffer(user, dtype=np.float64) if user else np.zeros(len(spec.user_fields)),
            user_found=bool(user),
            items=matrix,
            item_found=found,
            item_known=known,
            engaged=engaged,
        )
