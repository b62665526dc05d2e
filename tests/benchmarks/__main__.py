"""`make bench`: every benchmark in order on one private Redis and lake, figures printed and as JSON.

python -m tests.benchmarks            # all
python -m tests.benchmarks etl        # one section (later sections need earlier ones)
python -m tests.benchmarks loop       # the loop's error rates on the loop simulator (no Redis, no lake)
"""

from __future__ import annotations

import json
import sys

from tests.benchmarks import bench_etl, bench_loop, bench_ranker, bench_train
from tests.benchmarks.common import bench_context

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
    print("BENCH_JSON " + json.dumps({k: v for k, v in figures.items() if k in wanted}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
