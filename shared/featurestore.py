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
local engaged = {}
if #KEYS > 2 then engaged = redis.call('SMEMBERS', KEYS[3]) end
local sid = redis.call('GET', KEYS[1])
if not sid then return {false, false, '', '', '', '', engaged} end
local ids = {}
for id in string.gmatch(ARGV[3], '[^,]+') do ids[#ids + 1] = id end
local base = ARGV[1] .. sid
local user = redis.call('HGET', base .. ':u', ARGV[2])
local rows, found, missing = {}, {}, {}
if #ids > 0 then
  local fetched = redis.call('HMGET', base .. ':i', unpack(ids))
  local blank = string.rep('\0', tonumber(ARGV[4]))
  for i = 1, #ids do
    if fetched[i] then
      rows[i] = fetched[i]
      found[i] = '1'
    else
      rows[i] = blank
      found[i] = '0'
      missing[#missing + 1] = ids[i]
    end
  end
end
local catalog, catalog_found = {}, {}
if #missing > 0 then
  local fetched = redis.call('HMGET', KEYS[2], unpack(missing))
  local blank = string.rep('\0', tonumber(ARGV[5]))
  for i = 1, #missing do
    if fetched[i] then
      catalog[i] = fetched[i]
      catalog_found[i] = '1'
    else
      catalog[i] = blank
      catalog_found[i] = '0'
    end
  end
end
return {
  sid, user, table.concat(rows), table.concat(found),
  table.concat(catalog), table.concat(catalog_found), engaged,
}
"""
"""Rows come back concatenated, with a '0'/'1' mask per row: a handful of replies instead of one per
item, which is most of the cost on the client side."""

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
        n_user, n_item, n_catalog = len(spec.user_fields), len(spec.item_fields), len(CATALOG_FIELDS)
        script_keys = [keys.features_current(fv), keys.CATALOG]
        if with_engaged:
            script_keys.append(keys.engaged_items(user_id))
        sid, user, rows, found_mask, catalog, catalog_mask, engaged = self._fetch(
            keys=script_keys,
            args=[
                f"{keys.PREFIX}:fs:{fv}:",
                user_id,
                ",".join(map(str, item_ids)),
                8 * n_item,
                8 * n_catalog,
            ],
        )
        n = len(item_ids)
        engaged_ids = frozenset(int(i) for i in engaged)
        if not sid:
            nothing = np.zeros(n, dtype=bool)
            return Fetched(
                None, np.zeros(n_user), False, np.zeros((n, n_item)), nothing, nothing, engaged_ids
            )
        matrix = np.frombuffer(rows, dtype=np.float64).reshape(n, n_item).copy()
        found = np.frombuffer(found_mask, dtype=np.uint8) == ord("1")
        known = found.copy()
        if catalog_mask:
            missing = np.flatnonzero(~found)
            hits = np.frombuffer(catalog_mask, dtype=np.uint8) == ord("1")
            catalog_rows = np.frombuffer(catalog, dtype=np.float64).reshape(missing.size, n_catalog)
            matrix[missing[hits], :n_catalog] = catalog_rows[hits]
            known[missing[hits]] = True
        return Fetched(
            snapshot_id=sid.decode(),
            user=np.frombuffer(user, dtype=np.float64) if user else np.zeros(n_user),
            user_found=bool(user),
            items=matrix,
            item_found=found,
            item_known=known,
            engaged=engaged_ids,
        )
