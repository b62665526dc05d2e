"""Every Redis key feedrank uses, in one place. Prefix `fr:`; `{...}` parts are filled by helpers.

Two Redis roles: the *queue* Redis (persistent: RQ, pipeline runs, locks, the clock, dedup) and the
*feature store* Redis (volatile: online features, the event stream, real-time signals).
"""

from __future__ import annotations

PREFIX = "fr"

# ---------------------------------------------------------------- queue Redis

CLOCK_ANCHOR = f"{PREFIX}:clock:anchor"
"""Wall time (epoch seconds) at which the world clock read `live_start`."""

WORLD_DRIFT = f"{PREFIX}:world:drift"
"""JSON overrides of the drift knobs injected at run time (shared.world.runtime)."""

ALERTS = f"{PREFIX}:monitor:alerts"
"""Stream of structured alerts (severity, what, value, threshold, window)."""

AUDIT = f"{PREFIX}:monitor:audit"
"""Stream of decisions with their numbers: retrains, gate results, promotions, rejections, rollbacks."""

MONITOR_LATEST = f"{PREFIX}:monitor:latest"
"""JSON of the latest monitoring report (what the monitor's /metrics exports)."""


MONITOR_AB = f"{PREFIX}:monitor:ab"
"""JSON of the latest A/B test figures and decision."""

DECISIONS = f"{PREFIX}:monitor:decisions"
"""Hash: decision kind -> how many times it was taken (exported as a counter)."""

RETRAIN_PENDING = f"{PREFIX}:monitor:retrain-pending"
"""JSON {reason, due_ms, monitor_run}: a retrain decided on an alert, waiting for post-alert data."""

RETRAIN_COOLDOWN = f"{PREFIX}:monitor:retrain-cooldown"
"""Set (NX, with a TTL) when a retrain starts: later alerts within the TTL start none."""

RETRAIN_ACTIVE = f"{PREFIX}:monitor:retrain-active"
"""JSON {dataset, train, gate, reason, at}: the run ids of the retrain in flight (its gate clears
the candidate alias; a candidate outliving its gate run is stale)."""

ROLLBACK_COOLDOWN = f"{PREFIX}:monitor:rollback-cooldown"
"""Set (with a TTL) after an automatic rollback: no retrain starts while it exists."""


def monitor_track(version: int) -> str:
    """JSON of a champion version's track: warm-up, quality baseline, CUSUM, rollback watch."""
    return f"{PREFIX}:monitor:track:{version}"


def monitor_ab_state(version: int) -> str:
    """JSON {since, state} of a challenger version's A/B test: when it started and the running
    minima of its always-valid p-values."""
    return f"{PREFIX}:monitor:ab-state:{version}"


INGEST_REPORTS = f"{PREFIX}:ingest:reports"
"""Stream of per-batch validation reports (capped)."""

INGEST_TOTALS = f"{PREFIX}:ingest:totals"
"""Hash of lifetime counters: received, stored, quarantined, duplicates (per kind)."""

SERVED_STREAM = f"{PREFIX}:served"
"""Stream of served feeds (the ranker's impression log), drained into the lake by ingest."""

SERVED_GROUP = "lake"
"""Consumer group of the served stream that writes it to the lake."""


def dedup_bucket(hour_ms: int) -> str:
    """Hash event_id -> id of the batch that owns it, for events whose timestamp falls in that hour."""
    return f"{PREFIX}:ingest:seen:{hour_ms}"


def dedup_batch(batch_id: str) -> str:
    """String, TTL: `pending` while an attempt of the batch may still write the lake (claim_ttl),
    `stored` once its files are in place (dedup_ttl). What an id owned by this batch is worth."""
    return f"{PREFIX}:ingest:batch:{batch_id}"


def ingest_body(kind: str, batch_id: str) -> str:
    """String, TTL: digest of the body first sent under this batch id (an Idempotency-Key names one
    body; the same key with another body is refused)."""
    return f"{PREFIX}:ingest:body:{kind}:{batch_id}"


def pipeline_run(run_id: str) -> str:
    """Hash describing one pipeline run: name, params, step job ids, created_at."""
    return f"{PREFIX}:pipeline:run:{run_id}"


def pipeline_runs(name: str) -> str:
    """Sorted set of run ids of one pipeline, scored by creation time."""
    return f"{PREFIX}:pipeline:runs:{name}"


def pipeline_followers(run_id: str) -> str:
    """List of runs chained after this one (cancelled if it fails)."""
    return f"{PREFIX}:pipeline:run:{run_id}:followers"


def pipeline_lock(name: str) -> str:
    """Holds the id of the one active run of a pipeline (SET NX with a TTL)."""
    return f"{PREFIX}:pipeline:lock:{name}"


# ---------------------------------------------------------------- feature-store Redis

EVENT_STREAM = f"{PREFIX}:events"
"""Stream of valid events, one entry per chunk of events serialised as Arrow IPC."""

CATALOG = f"{PREFIX}:catalog"
"""Hash item_id -> packed (creator_id, topic_id, published_at) for items not yet in a snapshot."""

FRESH_ITEMS = f"{PREFIX}:rt:fresh"
"""Sorted set item_id -> published_at: the freshest items, a candidate pool."""


def features_current(feature_version: str) -> str:
    """Id of the live online-feature snapshot of one feature version."""
    return f"{PREFIX}:fs:{feature_version}:current"


def features_meta(feature_version: str, snapshot_id: str) -> str:
    """JSON metadata of a snapshot: as_of, field layout, counts."""
    return f"{PREFIX}:fs:{feature_version}:{snapshot_id}:meta"


def features_users(feature_version: str, snapshot_id: str) -> str:
    """Hash user_id -> packed float64 user counters."""
    return f"{PREFIX}:fs:{feature_version}:{snapshot_id}:u"


def features_items(feature_version: str, snapshot_id: str) -> str:
    """Hash item_id -> packed float64 item (and creator) counters."""
    return f"{PREFIX}:fs:{feature_version}:{snapshot_id}:i"


def engaged_items(user_id: int) -> str:
    """Set of items the user clicked, liked or hid: the ranker does not show them again."""
    return f"{PREFIX}:rt:engaged:{user_id}"


def popular_bucket(bucket_ms: int) -> str:
    """Sorted set item_id -> clicks within one time bucket (trending pool)."""
    return f"{PREFIX}:rt:pop:{bucket_ms}"


def topic_popular_bucket(topic_id: int, bucket_ms: int) -> str:
    """Sorted set item_id -> clicks within one bucket, per topic (the user's favoured topics)."""
    return f"{PREFIX}:rt:pop:{bucket_ms}:t{topic_id}"


def candidate_scratch(token: str) -> str:
    """A ranker's temporary union of popularity buckets, deleted in the same round trip (the only
    keys the ranker may write in the online store)."""
    return f"{PREFIX}:rt:scratch:{token}"
