"""traffic simulator entry point: `python -m services.traffic run [--duration SECONDS] [--rate RPS]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from shared.config import DriftConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.traffic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="play simulated users against the ranker")
    run.add_argument("--duration", type=float, default=None, help="seconds (default: until stopped)")
    run.add_argument("--rate", type=float, default=None, help="requests per second (default: config)")
    drift = sub.add_parser("inject-drift", help="start a drift knob now (or clear all with --clear)")
    drift.add_argument("knob", nargs="?", choices=list(DriftConfig.model_fields))
    drift.add_argument("--clear", action="store_true", help="remove every injected drift")
    args = parser.parse_args(argv)
    if args.command == "inject-drift":
        return _inject(args)
    if args.rate is not None and args.rate <= 0:
        print("--rate must be positive", file=sys.stderr)
        return 2

    from services.traffic.simulator import TrafficSimulator
    from shared.clock import AcceleratedClock
    from shared.connections import queue_redis
    from shared.logging import configure
    from shared.settings import get_settings

    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    data = settings.data_config()
    traffic = settings.serving_config().traffic
    if args.rate is not None:
        traffic = traffic.model_copy(update={"rate": args.rate})
    from shared.world.runtime import live_world

    conn = queue_redis(settings)
    simulator = TrafficSimulator(
        live_world(data, conn),
        AcceleratedClock.shared(conn, data),
        traffic,
        settings.ranker_url,
        settings.ingest_url,
        seed=data.seed,
        drift_source=conn,
    )
    stats = asyncio.run(simulator.run(args.duration))
    print(json.dumps(stats.__dict__, indent=2))
    return 0


def _inject(args: argparse.Namespace) -> int:
    from shared.clock import AcceleratedClock
    from shared.connections import queue_redis
    from shared.settings import get_settings
    from shared.timeutil import iso
    from shared.world.runtime import clear_drift, inject_drift

    settings = get_settings()
    conn = queue_redis(settings)
    if args.clear:
        clear_drift(conn)
        print("all injected drift cleared")
        return 0
    if args.knob is None:
        print("name a drift knob, or --clear", file=sys.stderr)
        return 2
    data = settings.data_config()
    now = AcceleratedClock.shared(conn, data).now_ms()
    overrides = inject_drift(conn, data, args.knob, now)
    print(f"{args.knob} starts at sim time {iso(now)}; injected drift now: {json.dumps(overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
