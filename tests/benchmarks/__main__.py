"""`make bench`: every benchmark in order on one private Redis and lake, figures printed, as JSON
and recorded in docs/benchmarks.md (tests/benchmarks/report.py).

python -m tests.benchmarks            # all
python -m tests.benchmarks etl        # one section (later sections need earlier ones)
python -m tests.benchmarks loop       # the loop's error rates on the loop simulator (no Redis, no lake)
"""

from __future__ import annotations

import json
import sys

from tests.benchmarks import bench_etl, bench_loop, bench_ranker, bench_train
from tests.benchmarks.common import PROFILE, bench_context
from tests.benchmarks.report import PAGE, record

SECTIONS = {
    "etl": bench_etl.run,
    "train": bench_train.run,
    "ranker": bench_ranker.run,
    "loop": bench_loop.run,
}
STANDALONE = {"loop"}
"""Sections with a world of their own: they need no earlier section."""


def main(argv: list[str]) -> int:
    wanted = argv or list(SECTIONS)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    chained = [s for s in SECTIONS if s not in STANDALONE]
    last = max((chained.index(s) for s in wanted if s in chained), default=-1)
    order = [*chained[: last + 1], *[s for s in SECTIONS if s in STANDALONE and s in wanted]]
    figures = {}
    with bench_context() as ctx:
        for name in order:  # later chained sections build on earlier ones
            figures[name] = SECTIONS[name](ctx)
            print()
    measured = {k: v for k, v in figures.items() if k in wanted}
    print("BENCH_JSON " + json.dumps(measured, default=float))
    # Every section that ran is recorded (`ranker` runs etl and train first: their figures count
    # too). Standalone sections use their own world; the others are the record only on `bench`.
    recorded = {k: v for k, v in figures.items() if k in STANDALONE or PROFILE == "bench"}
    if recorded:
        record(recorded)
        print(f"figures of {', '.join(recorded)} recorded in {PAGE.relative_to(PAGE.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
