"""ETL throughput and peak memory: the `bench` world (~1M events) through the real etl pipeline.

A private Redis, a real RQ worker process, every step (generate, validate, features, split,
materialize). Target (issue #2): 1M events end to end in under 30 s.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from shared.dags import etl_params, etl_pipeline
from shared.pipeline import PipelineRunner
from tests.benchmarks.common import PROFILE, BenchContext
from tests.support import run_worker

TARGET_SECONDS = 30.0


def run(ctx: BenchContext) -> dict[str, Any]:
    runner = PipelineRunner(ctx.queue, ctx.data.pipeline)
    run_id = runner.submit(etl_pipeline(ctx.data), etl_params(ctx.data, "simulate"))
    assert run_id is not None
    started = time.perf_counter()
    result = run_worker(ctx.env, [ctx.data.queues.ingest, ctx.data.queues.features])
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    view = runner.run(run_id)
    if result.returncode != 0 or view is None or view.status != "finished":
        print(result.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"etl did not finish: {view.status if view else 'no run'}")
    steps = {s.name: s.result or {} for s in view.steps}
    events = int(steps["generate"]["received"])
    figures = {
        "events": events,
        "examples": steps["features"]["rows"],
        "wall_seconds": round(wall, 2),
        "events_per_second": round(events / wall),
        "step_seconds": {name: r.get("seconds") for name, r in steps.items()},
        "peak_rss_mb": round(peak_mb),
        "target_seconds": TARGET_SECONDS,
        "met": wall < TARGET_SECONDS,
    }
    print(f"ETL (profile={PROFILE}, one RQ worker process, private Redis)")
    print(f"  events            {events:>12,}")
    verdict = "met" if figures["met"] else "MISSED"
    print(f"  wall time         {wall:>12.2f} s   (target < {TARGET_SECONDS:.0f} s: {verdict})")
    print(f"  throughput        {figures['events_per_second']:>12,} events/s")
    print(f"  peak RSS (worker) {figures['peak_rss_mb']:>12,} MB")
    for name, seconds in figures["step_seconds"].items():
        print(f"    {name:<12} {seconds:>8.2f} s")
    return figures
