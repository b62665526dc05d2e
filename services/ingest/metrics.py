"""Ingest metrics: counts reconcile as received = stored + quarantined + duplicates, per kind."""

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import JOB_BUCKETS

EVENTS = Counter(
    "feedrank_ingest_records_total",
    "Records by kind (events, items) and outcome (received, stored, quarantined, duplicate).",
    ["kind", "outcome"],
)
RULE_FAILURES = Counter(
    "feedrank_ingest_rule_failures_total", "Rows failing each validation rule.", ["kind", "rule"]
)
BATCHES = Counter("feedrank_ingest_batches_total", "Batches ingested by kind and source.", ["kind", "source"])
REJECTED_BODIES = Counter(
    "feedrank_ingest_rejected_bodies_total", "Request bodies rejected as a whole, by reason.", ["reason"]
)
BATCH_SECONDS = Histogram(
    "feedrank_ingest_batch_seconds", "Time to validate and store one batch.", ["kind"], buckets=JOB_BUCKETS
)

SERVED_WRITTEN = Counter("feedrank_served_drained_total", "Served feeds the drain wrote to the lake.")
SERVED_CLAIMED = Counter(
    "feedrank_served_claimed_total", "Pending served feeds claimed from another (gone) consumer."
)
SERVED_LENGTH = Gauge(
    "feedrank_served_stream_length", "Entries in the served stream (acknowledged ones are trimmed)."
)
SERVED_LAG = Gauge("feedrank_served_stream_lag", "Served feeds not yet handed to the drain.")
SERVED_PENDING = Gauge(
    "feedrank_served_stream_pending", "Served feeds handed to a drain, not yet acknowledged."
)
SERVED_OLDEST_AGE = Gauge(
    "feedrank_served_stream_oldest_unacked_seconds",
    "Age of the oldest served feed not yet in the lake (0 when the drain is caught up).",
)
