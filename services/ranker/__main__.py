"""ranker entry point: `python -m services.ranker serve`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ranker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    if args.workers > 1:
        # Several worker processes share one /metrics view through prometheus-client's
        # multiprocess mode, which must be on before prometheus_client is imported.
        from shared.multiproc import prepare_multiprocess_dir

        prepare_multiprocess_dir()

    import uvicorn

    from services.ranker.app import create_app
    from shared.settings import get_settings

    if args.workers > 1:
        uvicorn.run(
            "services.ranker.app:create_app", factory=True, host=args.host, port=args.port,
            workers=args.workers, log_config=None, access_log=False,
        )  # fmt: skip
    else:
        uvicorn.run(
            create_app(get_settings()), host=args.host, port=args.port, log_config=None, access_log=False
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
