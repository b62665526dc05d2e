"""traffic simulator entry point: `python -m services.traffic run [--duration SECONDS] [--rate RPS]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.traffic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="play simulated users against the ranker")
    run.add_argument("--duration", type=float, default=None, help="seconds (default: until stopped)")
    run.add_argument("--rate", type=float, default=None, help="requests per second (default: config)")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        print("--rate must be positive", file=sys.stderr)
        return 2

    from services.traffic.simulator import TrafficSimulator, live_world
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
    simulator = TrafficSimulator(
        live_world(data),
        AcceleratedClock.shared(queue_redis(settings), data),
        traffic,
        settings.ranker_url,
        settings.ingest_url,
        seed=data.seed,
    )
    stats = asyncio.run(simulator.run(args.duration))
    print(json.dumps(stats.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
