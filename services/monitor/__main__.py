"""monitor entry point: `python -m services.monitor COMMAND` (serve, worker, scheduler, run, ...)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.monitor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="HTTP: /metrics, /report, /alerts, /audit")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8002)
    worker = sub.add_parser("worker", help="run an RQ worker (default queue: monitoring)")
    worker.add_argument("--queues", nargs="+", default=None)
    worker.add_argument("--burst", action="store_true")
    worker.add_argument("--metrics-port", type=int, default=None)
    sub.add_parser("scheduler", help="RQ cron: the monitoring pipeline every schedule_every")
    run = sub.add_parser("run", help="submit one monitoring run now")
    run.add_argument("--wait", type=float, default=0, metavar="SECONDS")
    for name in ("alerts", "audit"):
        listing = sub.add_parser(name, help=f"recent {name}")
        listing.add_argument("--limit", type=int, default=20)
    sub.add_parser("report", help="the latest monitoring report")
    sub.add_parser("rollback", help="champion goes back to the previous champion (recorded in the audit log)")
    args = parser.parse_args(argv)

    if args.command == "worker":
        from shared.multiproc import prepare_multiprocess_dir

        prepare_multiprocess_dir()
        from shared.settings import get_settings
        from shared.worker import run_worker

        settings = get_settings()
        queues = args.queues or [settings.data_config().queues.monitoring]
        run_worker(settings, queues, burst=args.burst, metrics_port=args.metrics_port)
        return 0

    from shared.connections import lake, queue_redis
    from shared.logging import configure
    from shared.settings import get_settings

    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    conn = queue_redis(settings)
    if args.command == "serve":
        import uvicorn

        from services.monitor.app import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False)
        return 0
    if args.command == "scheduler":
        from services.monitor.schedule import build_scheduler

        build_scheduler(conn, settings.data_config(), settings.monitoring_config()).start()  # type: ignore[no-untyped-call]
        return 0
    if args.command == "run":
        from shared.dags import submit_monitor
        from shared.pipeline import PipelineRunner

        monitoring = settings.monitoring_config()
        run_id = submit_monitor(conn, settings.data_config(), monitoring)
        if run_id is None:
            print("a monitoring run is already active", file=sys.stderr)
            return 1
        print(run_id)
        if args.wait:
            view = PipelineRunner(conn, monitoring.pipeline).wait(run_id, args.wait)
            print(
                json.dumps(
                    [
                        {"step": s.name, "status": s.status, "result": s.result, "error": s.error}
                        for s in view.steps
                    ],
                    indent=2,
                    default=str,
                )
            )
            return 0 if view.status == "finished" else 1
        return 0
    if args.command in ("alerts", "audit"):
        from services.monitor import alerts, audit

        rows = (
            alerts.recent(conn, args.limit) if args.command == "alerts" else audit.entries(conn, args.limit)
        )
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    if args.command == "report":
        from shared import keys

        print(json.dumps(json.loads(conn.get(keys.MONITOR_LATEST) or b"{}"), indent=2))
        return 0
    if args.command == "rollback":
        from services.monitor.jobs import roll_back_champion
        from shared.registry import Registry, RegistryError

        registry = Registry(settings.mlflow_tracking_uri, settings.ranking_model_config().registry)
        try:
            before, after = roll_back_champion(
                conn, lake(settings), registry, settings.monitoring_config(), automatic=False
            )
        except RegistryError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"champion rolled back from version {before} to version {after}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
