"""Cross-batch duplicate detection on event_id, atomic in Redis, losing no acknowledged event.

Each event id is owned by the first batch that claims it, recorded in a per-hour hash (id ->
batch id, Lua). What an owner's claim is worth depends on the state of that batch, one key per
batch: `pending` from the start of its attempt for `claim_ttl` (a deadline kept by Redis, so
replicas agree), `stored` once its files are in the lake (the commit, one command per batch).
A crash or a full disk between the claim and the lake write therefore never turns an event into a
"duplicate" of nothing. When a batch meets an id:

* free: it claims it and stores it;
* owned by the *same* batch id (a retry: the same Idempotency-Key, or the same body): it owns it
  and rewrites its file with it, so a retry never loses its own events;
* owned by a `stored` batch: a duplicate;
* owned by a `pending` batch: that batch is storing it right now, so this batch is refused as a
  whole (409, retry) rather than acknowledging an event that is not stored yet;
* owned by a batch whose state has expired (it crashed, or its disk was full): the lake decides.
  If that batch's file for the event's hour holds the id, it was stored and only the commit was
  lost: a duplicate. Otherwise this batch takes the id over.

A batch gives up (503, retry) rather than write once half its claim time has passed, so a batch
that was too slow cannot write an id that another batch has meanwhile taken over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from redis import Redis

from shared import keys
from shared.timeutil import HOUR_MS

STORED, PENDING = b"stored", b"pending"

_BEGIN = """
local state = redis.call('GET', KEYS[1])
if state ~= 'stored' then
  redis.call('SET', KEYS[1], 'pending', 'PX', ARGV[1])
end
return state
"""
"""Start (or restart) an attempt of a batch: pending for claim_ttl, unless it is already stored."""

_CLAIM = """
local batch = ARGV[1]
local owners = redis.call('HMGET', KEYS[1], unpack(ARGV, 3))
local claims, out = {}, {}
for i, owner in ipairs(owners) do
  if owner == false then
    claims[#claims + 1] = ARGV[i + 2]
    claims[#claims + 1] = batch
    out[i] = 0
  elseif owner == batch then
    out[i] = 1
  else
    out[i] = owner
  end
end
if #claims > 0 then
  redis.call('HSET', KEYS[1], unpack(claims))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return out
"""
"""Per id: 0 claimed now, 1 already this batch's, else the owning batch id."""

_TAKE_OVER = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {}
end
local owners = redis.call('HMGET', KEYS[1], unpack(ARGV, 3))
local taken, out = {}, {}
for i, owner in ipairs(owners) do
  if owner == ARGV[2] then
    taken[#taken + 1] = ARGV[i + 2]
    taken[#taken + 1] = ARGV[1]
    out[#out + 1] = ARGV[i + 2]
  end
end
if #taken > 0 then
  redis.call('HSET', KEYS[1], unpack(taken))
end
return out
"""
"""Ids of an expired batch (KEYS[2] its state, still absent) that its files do not hold: now ours."""

_RELEASE = """
local owners = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
local gone = {}
for i, owner in ipairs(owners) do
  if owner == ARGV[1] then
    gone[#gone + 1] = ARGV[i + 1]
  end
end
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
end
return #gone
"""

_CHUNK = 2500
"""Ids per script call: Lua's unpack() limit is ~8000 values and HSET takes two per id."""

StoredIn = Callable[[str, int], frozenset[str]]
"""(batch id, hour start ms) -> event ids in that batch's lake file of that hour."""


@dataclass(frozen=True)
class Claims:
    """One attempt's claims. Per id: `own` ids belong in this batch's files, `new` ones are
    stored for the first time by this attempt, `busy` ones are being stored by another batch now,
    `taken_now` were claimed by this attempt (what a release gives back)."""

    own: np.ndarray
    new: np.ndarray
    busy: np.ndarray
    taken_now: np.ndarray
    already_stored: bool  # the batch was committed before: this is a replay


class Deduplicator:
    def __init__(self, conn: Redis, ttl: timedelta, claim_ttl: timedelta) -> None:
        self._conn = conn
        self._ttl_s = max(1, int(ttl.total_seconds()))
        self.claim_ttl_s = claim_ttl.total_seconds()
        self._begin = conn.register_script(_BEGIN)
        self._claim = conn.register_script(_CLAIM)
        self._take_over = conn.register_script(_TAKE_OVER)
        self._release = conn.register_script(_RELEASE)

    @staticmethod
    def _groups(ts_ms: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(hour start ms, row indices) per hour bucket, in chunks of at most _CHUNK."""
        hours = ts_ms // HOUR_MS
        order = np.argsort(hours, kind="stable")
        bounds = np.flatnonzero(np.diff(hours[order])) + 1
        for group in np.split(order, bounds):
            for lo in range(0, group.size, _CHUNK):
                yield int(hours[group[0]]) * HOUR_MS, group[lo : lo + _CHUNK]

    def claim(self, event_ids: list[str], ts_ms: np.ndarray, batch_id: str, stored_in: StoredIn) -> Claims:
        """Start an attempt of `batch_id` and claim its ids (the module docstring says how)."""
        n = len(event_ids)
        claimed, mine = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        others: dict[str, list[tuple[int, int]]] = {}  # owner batch -> [(row, hour_ms)]
        with self._conn.pipeline(transaction=False) as pipe:
            self._begin(keys=[keys.dedup_batch(batch_id)], args=[int(self.claim_ttl_s * 1000)], client=pipe)
            calls = []
            for hour_ms, rows in self._groups(ts_ms):
                self._claim(
                    keys=[keys.dedup_bucket(hour_ms)],
                    args=[batch_id, self._ttl_s, *(event_ids[i] for i in rows)],
                    client=pipe,
                )
                calls.append((hour_ms, rows))
            state, *results = pipe.execute()
        for (hour_ms, rows), flags in zip(calls, results, strict=True):
            for row, flag in zip(rows, flags, strict=True):
                if flag == 0:
                    claimed[row] = True
                elif flag == 1:
                    mine[row] = True
                else:
                    others.setdefault(flag.decode(), []).append((int(row), hour_ms))
        busy, taken_over = self._settle_others(event_ids, batch_id, others, stored_in)
        already_stored = state == STORED
        own = claimed | mine | taken_over
        return Claims(
            own=own,
            new=claimed | taken_over | (mine if not already_stored else np.zeros(n, dtype=bool)),
            busy=busy,
            taken_now=claimed | taken_over,
            already_stored=already_stored,
        )

    def _settle_others(
        self,
        event_ids: list[str],
        batch_id: str,
        others: dict[str, list[tuple[int, int]]],
        stored_in: StoredIn,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids owned by other batches: duplicates (stored), busy (pending), or, when the owner's
        attempt expired, a duplicate if its lake file holds the id and ours otherwise."""
        n = len(event_ids)
        busy, taken_over = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if not others:
            return busy, taken_over
        owners = list(others)
        states = self._conn.mget([keys.dedup_batch(owner) for owner in owners])
        for owner, state in zip(owners, states, strict=True):
            if state == STORED:
                continue
            if state == PENDING:
                busy[[row for row, _ in others[owner]]] = True
                continue
            by_hour: dict[int, list[int]] = {}
            for row, hour_ms in others[owner]:
                by_hour.setdefault(hour_ms, []).append(row)
            for hour_ms, rows in by_hour.items():
                held = stored_in(owner, hour_ms)
                orphans = [row for row in rows if event_ids[row] not in held]
                if not orphans:
                    continue
                taken = self._take_over(
                    keys=[keys.dedup_bucket(hour_ms), keys.dedup_batch(owner)],
                    args=[batch_id, owner, *(event_ids[row] for row in orphans)],
                )
                got = {t.decode() for t in taken}
                for row in orphans:
                    if event_ids[row] in got:
                        taken_over[row] = True
                    else:
                        busy[row] = True  # the owner came back meanwhile: let it finish, retry
        return busy, taken_over

    def commit(self, batch_id: str) -> None:
        """The batch's files are in the lake: every id it owns now counts as stored."""
        self._conn.set(keys.dedup_batch(batch_id), STORED, ex=self._ttl_s)

    def release(self, event_ids: list[str], ts_ms: np.ndarray, batch_id: str) -> int:
        """Give back ids this attempt claimed, when it is refused before writing anything."""
        if not event_ids:
            return 0
        with self._conn.pipeline(transaction=False) as pipe:
            for hour_ms, rows in self._groups(ts_ms):
                self._release(
                    keys=[keys.dedup_bucket(hour_ms)],
                    args=[batch_id, *(event_ids[i] for i in rows)],
                    client=pipe,
                )
            return sum(int(n) for n in pipe.execute())
