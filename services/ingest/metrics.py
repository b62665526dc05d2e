"""Ingest metrics: counts reconcile as received = stored + quarantined + duplicates, per kind."""

from prometheus_client import Counter, Histogram

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
