"""The online feature store on Redis, laid out for the ranker's read path.

A snapshot of one feature version is two hashes, users and items, whose values are packed float64
rows (layouts: FeatureSpec.user_fields / item_fields). The ranker needs one user and a few hundred
items per request, so a single Lua call reads the snapshot pointer, HGETs the user row and HMGETs
every item row (falling back to the catalog for items newer than the snapshot): one round trip,
and because the pointer is read inside the script, a request never mixes two snapshots. Packed
rows turn into a numpy matrix with one `frombuffer`, with no per-field parsing.

Snapshots are immutable: a new one is written under its own id, then the per-version pointer is
moved atomically (never backwards in time), and the superseded snapshot expires after a grace
period. Every key carries a TTL, so an abandoned version cleans itself up.
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

_FETCH = """
local sid = redis.call('GET', KEYS[1])
if not sid then
  local engaged = {}
  if #KEYS > 2 then engaged = redis.call('SMEMBERS', KEYS[3]) end
  return {false, false, {}, {}, engaged}
end
local base = ARGV[1] .. sid
local user = redis.call('HGET', base .. ':u', ARGV[2])
local items = {}
local missing = {}
if #ARGV > 2 then
  items = redis.call('HMGET', base .. ':i', unpack(ARGV, 3))
  for i, row in ipairs(items) do
    if not row then missing[#missing + 1] = ARGV[i + 2] end
  end
end
local catalog = {}
if #missing > 0 then catalog = redis.call('HMGET', KEYS[2], unpack(missing)) end
local engaged = {}
if #KEYS > 2 then engaged = redis.call('SMEMBERS', KEYS[3]) end
return {sid, user, items, catalog, engaged}
"""

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
    """Rows for one request. Missing users/items are zero rows (no history) with found=False."""

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
        self._fetch = conn.register_script(_FETCH)
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
        """One round trip: the user's row and every item's row from the same snapshot (and, if
        asked, the set of items the user already engaged with)."""
        fv = spec.version
        script_keys = [keys.features_current(fv), keys.CATALOG]
        if with_engaged:
            script_keys.append(keys.engaged_items(user_id))
        sid, user, rows, catalog, engaged = self._fetch(
            keys=script_keys, args=[f"{keys.PREFIX}:fs:{fv}:", user_id, *item_ids]
        )
        n_user, n_item = len(spec.user_fields), len(spec.item_fields)
        user_vec = np.frombuffer(user, dtype=np.float64) if user else np.zeros(n_user)
        n = len(item_ids)
        matrix = np.zeros((n, n_item))
        found = np.zeros(n, dtype=bool)
        if rows:
            present = [i for i, row in enumerate(rows) if row]
            if present:
                found[present] = True
                matrix[present] = np.frombuffer(b"".join(rows[i] for i in present), dtype=np.float64).reshape(
                    len(present), n_item
                )
        known = found.copy()
        missing = np.flatnonzero(~found)
        if catalog:
            hits = [(missing[j], row) for j, row in enumerate(catalog) if row]
            if hits:
                idx = np.array([h[0] for h in hits])
                matrix[idx, : len(CATALOG_FIELDS)] = np.frombuffer(
                    b"".join(h[1] for h in hits), np.float64
                ).reshape(len(hits), len(CATALOG_FIELDS))
                known[idx] = True
        return Fetched(
            snapshot_id=sid.decode() if isinstance(sid, bytes) else None,
            user=user_vec,
            user_found=bool(user),
            items=matrix,
            item_found=found,
            item_known=known,
            engaged=frozenset(int(i) for i in engaged),
        )
