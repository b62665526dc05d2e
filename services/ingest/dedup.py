"""Cross-batch duplicate detection on event_id, atomic in Redis.

Each event id is claimed in a per-hour hash (id -> batch id) by a Lua script, so concurrent ingest
replicas never both store the same event. A claim made by the *same* batch id counts as new: a
retried batch (same id) rewrites its own lake files instead of losing its events as "duplicates".
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from redis import Redis

from shared import keys
from shared.timeutil import HOUR_MS

_CLAIM = """
local owners = redis.call('HMGET', KEYS[1], unpack(ARGV, 3))
local batch = ARGV[1]
local fresh, out = {}, {}
for i, owner in ipairs(owners) do
  if owner == false then
    fresh[#fresh + 1] = ARGV[i + 2]
    fresh[#fresh + 1] = batch
    out[i] = 1
  elseif owner == batch then
    out[i] = 1
  else
    out[i] = 0
  end
end
if #fresh > 0 then
  redis.call('HSET', KEYS[1], unpack(fresh))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return out
"""

_CHUNK = 2500
"""Ids per script call: Lua's unpack() limit is ~8000 values and HSET takes two per id."""


class Deduplicator:
    def __init__(self, conn: Redis, ttl: timedelta) -> None:
        self._conn = conn
        self._ttl_s = max(1, int(ttl.total_seconds()))
        self._claim = conn.register_script(_CLAIM)

    def claim(self, event_ids: list[str], ts_ms: np.ndarray, batch_id: str) -> np.ndarray:
        """Return a mask: True where the id is new (or already owned by this batch)."""
        fresh = np.zeros(len(event_ids), dtype=bool)
        if not event_ids:
            return fresh
        hours = ts_ms // HOUR_MS
        order = np.argsort(hours, kind="stable")
        bounds = np.flatnonzero(np.diff(hours[order])) + 1
        with self._conn.pipeline(transaction=False) as pipe:
            calls: list[np.ndarray] = []
            for group in np.split(order, bounds):
                key = keys.dedup_bucket(int(hours[group[0]]) * HOUR_MS)
                for lo in range(0, group.size, _CHUNK):
                    rows = group[lo : lo + _CHUNK]
                    self._claim(
                        keys=[key], args=[batch_id, self._ttl_s, *(event_ids[i] for i in rows)], client=pipe
                    )
                    calls.append(rows)
            results = pipe.execute()
        for rows, flags in zip(calls, results, strict=True):
            fresh[rows] = np.asarray(flags, dtype=bool)
        return fresh
