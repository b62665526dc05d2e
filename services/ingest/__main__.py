"""ingest's entry point: `python -m services.ingest {serve,worker,backfill,reports}`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8001)
    worker = sub.add_parser("worker", help="run an RQ worker on the ingest queue")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--metrics-port", type=int, default=None)
    backfill = sub.add_parser("backfill", help="simulate N days of history and ingest it")
    backfill.add_argument("--days", type=int, default=None, help="default: backfill.days from config")
    drain_cli = sub.add_parser(
        "drain-served", help="write the ranker's impression log (Redis stream) to the lake"
    )
    drain_cli.add_argument(
        "--consumer", default=None, help="consumer name (default: ingest.served_drain.consumer)"
    )
    drain_cli.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics (lag) here"
    )
    reports = sub.add_parser("reports", help="print recent batch validation reports")
    reports.add_argument("--limit", type=int, default=10)
    args = parser.parse_args(argv)

    if args.command == "worker":
        from shared.multiproc import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # before prometheus_client is imported
        from shared.settings import get_settings
        from shared.worker import run_worker

        settings = get_settings()
        run_worker(
            settings, [settings.data_config().queues.ingest], burst=args.burst, metrics_port=args.metrics_port
        )
        return 0

    from shared.settings import get_settings

    settings = get_settings()
    if args.command == "serve":
        import uvicorn

        from services.ingest.app import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)
        return 0
    if args.command == "backfill":
        return _backfill(args.days)
    if args.command == "drain-served":
        from services.ingest.served import ServedDrain
        from shared.connections import lake, queue_redis
        from shared.logging import configure
        from shared.metrics import serve as serve_metrics

        configure(settings.log_level, settings.log_format)
        if args.metrics_port:
            serve_metrics(args.metrics_port)
        ServedDrain(
            queue_redis(settings), lake(settings), settings.data_config().ingest.served_drain, args.consumer
        ).run_forever()
        return 0
    if args.command == "reports":
        from shared import keys
        from shared.connections import queue_redis

        for _, fields in queue_redis(settings).xrevrange(keys.INGEST_REPORTS, count=args.limit):
            print(json.dumps(json.loads(fields[b"report"]), sort_keys=True))
        return 0
    return 2


def _backfill(days: int | None) -> int:
    from datetime import timedelta

    from services.ingest.backfill import backfill
    from services.ingest.ingestion import Ingestor
    from shared.clock import FixedClock
    from shared.connections import lake, queue_redis, store_redis
    from shared.logging import configure
    from shared.settings import get_settings
    from shared.timeutil import to_ms
    from shared.world import World

    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    config = settings.data_config()
    if days is not None and days <= 0:
        print("--days must be positive", file=sys.stderr)
        return 2
    end = config.world.start + timedelta(days=days or config.backfill.days)
    ingestor = Ingestor(
        lake=lake(settings),
        queue_redis=queue_redis(settings),
        store_redis=store_redis(settings),
        config=config,
        clock=FixedClock(to_ms(end)),
    )
    summary = backfill(ingestor, World.create(config), config.world.start, end, config.backfill.batch_events)
    print(json.dumps(summary.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
