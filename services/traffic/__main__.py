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
    drift.add_argument(
        "--params", default="{}", metavar="JSON", help="knob parameters, e.g. '{\"delta_logit\": 2.0}'"
    )
    drift.add_argument(
        "--against-served",
        action="store_true",
        help="topic_popularity only: the topics served most in the last simulated hour fall, the least rise",
    )
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
    from shared.connections import lake, queue_redis
    from shared.settings import get_settings
    from shared.timeutil import HOUR_MS, iso
    from shared.world.runtime import abandoned_topics_swing, clear_drift, inject_drift, served_topic_counts

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
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        print(f"--params is not JSON: {exc}", file=sys.stderr)
        return 2
    if args.against_served:
        if args.knob != "topic_popularity":
            print("--against-served aims the topic_popularity knob only", file=sys.stderr)
            return 2
        the_lake = lake(settings)
        counts = served_topic_counts(
            the_lake.read_served(now - HOUR_MS, now), the_lake.read_catalog(), data.world.n_topics
        )
        if counts.sum() == 0:
            print("nothing was served in the last simulated hour: no topics to aim at", file=sys.stderr)
            return 1
        params = {**abandoned_topics_swing(counts), **params}
    try:
        overrides = inject_drift(conn, data, args.knob, now, **params)
    except ValueError as exc:  # an unknown knob or parameters the config rejects
        print(f"cannot inject {args.knob}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.knob} starts at sim time {iso(now)}; injected drift now: {json.dumps(overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
