"""The audit log: every decision the loop makes, with its numbers, in Redis, the lake and MLflow."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlflow
import structlog
from redis import Redis

from shared import keys
from shared.lake import write_json_atomic

log = structlog.get_logger(__name__)

EXPERIMENT = "feedrank-decisions"


def record(conn: Redis, lake_root: Path, kind: str, **details: Any) -> dict[str, Any]:
    entry = {"kind": kind, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
    conn.xadd(keys.AUDIT, {"entry": json.dumps(entry, default=str)}, maxlen=100_000, approximate=True)
    conn.hincrby(keys.DECISIONS, kind, 1)
    write_json_atomic(entry, lake_root / "audit" / f"{time.time_ns()}-{kind}.json")
    try:
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=kind):
            mlflow.set_tag("feedrank.decision", kind)
            flat = {
                k: v for k, v in details.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            mlflow.log_metrics({k: float(v) for k, v in flat.items()})
            mlflow.log_params({k: str(v)[:500] for k, v in details.items() if k not in flat})
            mlflow.log_dict(entry, "decision.json")
    except Exception as exc:
        log.warning("audit_mlflow_failed", error=repr(exc))
    log.info("decision", **entry)
    return entry


def entries(conn: Redis, limit: int) -> list[dict[str, Any]]:
    return [json.loads(fields[b"entry"]) for _, fields in conn.xrevrange(keys.AUDIT, count=limit)]
