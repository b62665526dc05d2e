"""feature service entry point: `python -m services.feature {worker,pipeline,scheduler,realtime}`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.feature", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run an RQ worker (default queue: features)")
    worker.add_argument("--queues", nargs="+", default=None, help="queue names (default: features)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument("--metrics-port", type=int, default=None)

    pipeline = sub.add_parser("pipeline", help="run and inspect pipelines")
    pipe_sub = pipeline.add_subparsers(dest="action", required=True)
    run = pipe_sub.add_parser("run", help="submit an etl run")
    run.add_argument("name", choices=["etl"])
    run.add_argument("--source", choices=["simulate", "lake"], default="simulate")
    run.add_argument(
        "--end", type=datetime.fromisoformat, default=None, help="window end, ISO-8601 with timezone"
    )
    run.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for the run to finish")
    runs = pipe_sub.add_parser("runs", help="list recent runs and their steps")
    runs.add_argument("--name", default="etl")
    runs.add_argument("--limit", type=int, default=10)
    runs.add_argument("--json", action="store_true")
    show = pipe_sub.add_parser("show", help="one run in full")
    show.add_argument("run_id")

    sub.add_parser("scheduler", help="run the RQ cron scheduler that enqueues scheduled pipelines")
    sub.add_parser("realtime", help="consume the event stream into real-time signals")
    args = parser.parse_args(argv)

    if args.command == "worker":
        from shared.multiproc import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # before prometheus_client is imported
        from shared.settings import get_settings
        from shared.worker import run_worker

        settings = get_settings()
        queues = args.queues or [settings.data_config().queues.features]
        run_worker(settings, queues, burst=args.burst, metrics_port=args.metrics_port)
        return 0

    from shared.connections import queue_redis, store_redis
    from shared.logging import configure
    from shared.settings import get_settings

    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    config = settings.data_config()
    conn = queue_redis(settings)

    if args.command == "pipeline":
        from shared.pipeline import PipelineRunner

        runner = PipelineRunner(conn, config.pipeline)
        if args.action == "run":
            from shared.dags import submit_etl

            if args.end is not None and args.end.tzinfo is None:
                print("--end needs a timezone, e.g. 2026-01-09T00:00:00+00:00", file=sys.stderr)
                return 2
            run_id = submit_etl(conn, config, args.source, args.end)
            if run_id is None:
                print(f"etl is already running ({runner.active_run('etl')}); not submitted", file=sys.stderr)
                return 1
            print(run_id)
            if args.wait:
                view = runner.wait(run_id, args.wait)
                _print_runs([view])
                return 0 if view.status == "finished" else 1
            return 0
        if args.action == "runs":
            views = runner.runs(args.name, args.limit)
            if args.json:
                print(
                    json.dumps(
                        [v.__dict__ | {"steps": [s.__dict__ for s in v.steps]} for v in views], indent=2
                    )
                )
            else:
                _print_runs(views)
            return 0
        if args.action == "show":
            found = runner.run(args.run_id)
            if found is None:
                print(f"no run {args.run_id}", file=sys.stderr)
                return 1
            print(json.dumps(found.__dict__ | {"steps": [s.__dict__ for s in found.steps]}, indent=2))
            return 0

    if args.command == "scheduler":
        return _scheduler(conn, config)
    if args.command == "realtime":
        from services.feature.realtime import RealtimeConsumer

        RealtimeConsumer(store_redis(settings), config.realtime).run_forever()
        return 0
    return 2


def _print_runs(views: list) -> None:  # type: ignore[type-arg]
    if not views:
        print("no runs")
    for view in views:
        print(f"{view.run_id}  {view.status:<8}  created {view.created_at}")
        for step in view.steps:
            detail = step.error or (json.dumps(step.result, default=str)[:120] if step.result else "")
            print(f"    {step.name:<12} {step.status:<9} {detail}")


def _scheduler(conn, config) -> int:  # type: ignore[no-untyped-def]
    from services.feature.schedule import build_scheduler

    try:
        cron = build_scheduler(conn, config)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    cron.start()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
