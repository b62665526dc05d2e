"""ETL throughput and peak memory: the `bench` world (~1M events) through the real etl pipeline.

Runs end to end as in production: a private Redis, a real RQ worker process, every step
(generate, validate, features, split, materialize). Prints events per second, wall time per step
and the worker's peak resident memory. Target (issue #2): 1M events in under 30 s.

    make bench            # or: python -m tests.benchmarks.bench_etl
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

from redis import Redis

from services.feature.pipelines import etl_params, etl_pipeline
from shared.config import load_data_config
from shared.pipeline import PipelineRunner
from shared.settings import REPO_CONFIG_DIR
from tests.support import private_redis, run_worker

TARGET_SECONDS = 30.0
PROFILE = "bench"


def main() -> int:
    config = load_data_config(REPO_CONFIG_DIR, PROFILE)
    with private_redis() as base, tempfile.TemporaryDirectory(prefix="feedrank-bench-") as tmp:
        env = {
            "FEEDRANK_QUEUE_URL": f"{base}/1",
            "FEEDRANK_FEATURE_STORE_URL": f"{base}/2",
            "FEEDRANK_LAKE_PATH": os.path.join(tmp, "lake"),
            "FEEDRANK_PROFILE": PROFILE,
            "FEEDRANK_LOG_LEVEL": "WARNING",
            "FEEDRANK_LOG_FORMAT": "console",
            "PROMETHEUS_MULTIPROC_DIR": os.path.join(tmp, "metrics"),
        }
        queue = Redis.from_url(env["FEEDRANK_QUEUE_URL"])
        for conn in (queue, Redis.from_url(env["FEEDRANK_FEATURE_STORE_URL"])):
            conn.flushdb()
        runner = PipelineRunner(queue, config.pipeline)
        run_id = runner.submit(etl_pipeline(config), etl_params(config, "simulate"))
        assert run_id is not None
        started = time.perf_counter()
        result = run_worker(env, [config.queues.ingest, config.queues.features])
        wall = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        view = runner.run(run_id)
        if result.returncode != 0 or view is None or view.status != "finished":
            print(result.stderr[-4000:], file=sys.stderr)
            print(f"etl did not finish: {view.status if view else 'no run'}", file=sys.stderr)
            return 1
    steps = {s.name: s.result or {} for s in view.steps}
    events = int(steps["generate"]["received"])
    step_total = sum(float(r.get("seconds", 0)) for r in steps.values())
    figures = {
        "events": events,
        "examples": steps["features"]["rows"],
        "wall_seconds": round(wall, 2),
        "events_per_second": round(events / wall),
        "step_seconds": {name: r.get("seconds") for name, r in steps.items()},
        "queue_and_fork_overhead_seconds": round(wall - step_total, 2),
        "peak_rss_mb": round(peak_mb),
        "target_seconds": TARGET_SECONDS,
        "met": wall < TARGET_SECONDS,
    }
    print("ETL benchmark (profile=bench, one RQ worker process, private Redis)")
    print(f"  events            {events:>12,}")
    print(
        f"  wall time         {wall:>12.2f} s   (target < {TARGET_SECONDS:.0f} s: {'met' if figures['met'] else 'MISSED'})"
    )
    print(f"  throughput        {figures['events_per_second']:>12,} events/s")
    print(f"  peak RSS (worker) {figures['peak_rss_mb']:>12,} MB")
    for name, seconds in figures["step_seconds"].items():
        print(f"    {name:<12} {seconds:>8.2f} s")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
