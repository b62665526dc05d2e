"""Ranker metrics: latency fine enough to read a p99 between 1 and 100 ms, per-stage time,
requests by status, variant and model version, candidates, fallbacks, scores, models, the log."""

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

REQUEST_SECONDS = Histogram(
    "feedrank_ranker_request_seconds",
    "Request latency inside the service, by endpoint and variant.",
    ["endpoint", "variant"],
    buckets=LATENCY_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "feedrank_ranker_stage_seconds",
    "Time per ranking stage: candidates, features, inference, post_ranking.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "feedrank_ranker_requests_total",
    "Requests by endpoint, HTTP status, variant and model version.",
    ["endpoint", "status", "variant", "model_version"],
)
CANDIDATES = Histogram(
    "feedrank_ranker_candidates",
    "Candidates scored per /rank request.",
    buckets=(0, 10, 25, 50, 100, 150, 200, 300, 500, 1000),
)
FALLBACKS = Counter(
    "feedrank_ranker_fallbacks_total", "Requests answered by the fallback, by reason.", ["reason"]
)
SCORES = Histogram(
    "feedrank_ranker_score",
    "Scores of the served items, by variant.",
    ["variant"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
)
MODEL_VERSION = Gauge(
    "feedrank_ranker_model_version",
    "Registry version served per variant (0 = none).",
    ["variant"],
    multiprocess_mode="mostrecent",
)
MODEL_RELOADS = Counter(
    "feedrank_ranker_model_reloads_total", "Model swaps by variant and outcome.", ["variant", "outcome"]
)
IMPRESSIONS_LOGGED = Counter(
    "feedrank_ranker_impressions_logged_total", "Served feeds written to the impression log."
)
IMPRESSIONS_DROPPED = Counter(
    "feedrank_ranker_impressions_dropped_total", "Served feeds dropped because the log buffer was full."
)
