"""trainer entry point: `python -m services.trainer {worker,pipeline,registry}`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run an RQ worker (default queue: training)")
    worker.add_argument("--queues", nargs="+", default=None)
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument("--metrics-port", type=int, default=None)

    pipeline = sub.add_parser("pipeline", help="submit training runs")
    pipe_sub = pipeline.add_subparsers(dest="action", required=True)
    run = pipe_sub.add_parser("run", help="submit `train` (or `etl+train`, the bootstrap chain)")
    run.add_argument("name", choices=["train", "etl+train"])
    run.add_argument("--after", default=None, metavar="RUN_ID", help="chain after this run (train only)")
    run.add_argument(
        "--dataset", default=None, help="dataset id (default: the newest of the feature version)"
    )
    run.add_argument(
        "--alias", default=None, help="registry alias (default: champion if none, else challenger)"
    )
    run.add_argument(
        "--source", choices=["simulate", "lake"], default="simulate", help="etl source (etl+train)"
    )
    run.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for the run to finish")

    registry = sub.add_parser(
        "registry",
        help="model versions, aliases and promotion (rollback: python -m services.monitor rollback, audited)",
    )
    reg_sub = registry.add_subparsers(dest="action", required=True)
    listing = reg_sub.add_parser("list", help="versions with metrics and aliases")
    listing.add_argument("--json", action="store_true")
    promote = reg_sub.add_parser("promote", help="make a version the champion (or give it another alias)")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default=None, help="default: champion")
    args = parser.parse_args(argv)

    if args.command == "worker":
        from shared.multiproc import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # before prometheus_client is imported
        from shared.settings import get_settings
        from shared.worker import run_worker

        settings = get_settings()
        queues = args.queues or [settings.data_config().queues.training]
        run_worker(settings, queues, burst=args.burst, metrics_port=args.metrics_port)
        return 0

    from shared.logging import configure
    from shared.settings import get_settings

    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    if args.command == "pipeline":
        return _pipeline(args, settings)
    return _registry(args, settings)


def _pipeline(args: argparse.Namespace, settings) -> int:  # type: ignore[no-untyped-def]
    from shared.connections import queue_redis
    from shared.dags import submit_etl_then_train, submit_train
    from shared.pipeline import PipelineRunner

    conn = queue_redis(settings)
    data, model = settings.data_config(), settings.ranking_model_config()
    if args.name == "train":
        run_id = submit_train(
            conn, model, data, after_run=args.after, dataset_id=args.dataset, alias=args.alias
        )
        runs = [run_id] if run_id else None
    else:
        chain = submit_etl_then_train(conn, data, model, args.source)
        runs = list(chain) if chain else None
    if not runs:
        print("a run of this pipeline is already active; not submitted", file=sys.stderr)
        return 1
    print(" ".join(runs))
    if args.wait:
        runner = PipelineRunner(conn, model.pipeline)
        views = [runner.wait(r, args.wait) for r in runs]
        for view in views:
            print(f"{view.run_id}  {view.status}")
            for step in view.steps:
                detail = step.error or json.dumps(step.result or {})[:150]
                print(f"    {step.name:<12} {step.status:<9} {detail}")
        return 0 if all(v.status == "finished" for v in views) else 1
    return 0


def _registry(args: argparse.Namespace, settings) -> int:  # type: ignore[no-untyped-def]
    from shared.registry import Registry, RegistryError

    model = settings.ranking_model_config()
    registry = Registry(settings.mlflow_tracking_uri, model.registry)
    try:
        if args.action == "list":
            versions = registry.versions()
            if args.json:
                print(json.dumps([v.__dict__ for v in versions], indent=2, default=str))
                return 0
            if not versions:
                print(f"no versions of {registry.name} yet")
            k = model.evaluation.ndcg_k
            header = f"{'version':>7}  {'aliases':<22} {'auc':>7} {'ndcg@' + str(k):>8} {'lift':>6}"
            print(f"{header}  feature_version  run")
            for v in versions:
                metric = {
                    name: v.metric(name) for name in ("test_auc", f"test_ndcg_at_{k}", f"lift_ndcg_at_{k}")
                }
                shown = [f"{x:.4f}" if x is not None else "-" for x in metric.values()]
                aliases = ",".join(v.aliases) or "-"
                row = f"{v.version:>7}  {aliases:<22} {shown[0]:>7} {shown[1]:>8} {shown[2]:>6}"
                feature_version, run = (
                    v.tags.get("feature_version", "-"),
                    v.tags.get("feedrank.pipeline_run", "-"),
                )
                print(f"{row}  {feature_version:<16} {run}")
            return 0
        if args.action == "promote":
            alias = args.alias or model.registry.champion_alias
            if alias == model.registry.champion_alias:
                previous = registry.promote(args.version)
                print(
                    f"version {args.version} is now {alias} (was {previous.version if previous else 'none'})"
                )
            else:
                registry.set_alias(alias, args.version)
                print(f"version {args.version} is now {alias}")
            return 0
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
