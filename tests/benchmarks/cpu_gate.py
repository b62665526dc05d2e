"""A CPU regression gate whose verdict is a ratio measured in one run.

Absolute timings on shared 2-core machines swing by tens of percent from run to run; the ratio of
two workloads timed in the same process, interleaved, barely moves. The ranker's CPU per request
(its whole /rank path without the HTTP server: parse, features from Redis, ONNX inference,
post-ranking, impression log, serialise) is divided by the CPU of a fixed reference workload of
the same kind (numpy, Python objects, JSON), and the ratio is compared with the committed baseline
in `gate_baseline.json`. CPU time of the calling thread, not wall time: waiting for Redis or for
the other core is not the ranker's cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BASELINE = Path(__file__).with_name("gate_baseline.json")
"""The committed ratio the gate compares with (refresh: FEEDRANK_UPDATE_GATE=1, see the test)."""
SLOWDOWN_LIMIT = 1.5
"""The gate fails when the ranker costs this many times its baseline share of CPU."""

_RNG = np.random.default_rng(0)
_X = _RNG.random((200, 64), dtype=np.float32)
_W1 = _RNG.random((64, 128), dtype=np.float32)
_W2 = _RNG.random((128, 1), dtype=np.float32)
_CANDIDATES = list(range(200))


def reference_work() -> bytes:
    """Fixed work shaped like one ranking: a JSON body in, 200 packed rows into a matrix, a small
    MLP over them, a top-k, JSON out."""
    body = json.loads(json.dumps({"user_id": 1, "candidates": _CANDIDATES, "k": 20}))
    rows = {i: _X[i].tobytes() for i in body["candidates"]}
    matrix = np.frombuffer(b"".join(rows.values()), dtype=np.float32).reshape(len(rows), -1)
    # einsum without `optimize` runs in numpy's own loops on this thread, never in BLAS's threads
    scores = np.einsum("ij,jk->ik", np.maximum(np.einsum("ij,jk->ik", matrix, _W1), 0.0), _W2).ravel()
    top = np.argsort(-scores, kind="stable")[: body["k"]]
    items = [{"item_id": int(i), "score": float(scores[i]), "position": p} for p, i in enumerate(top)]
    return json.dumps({"items": items, "request_id": f"{len(rows):08x}"}).encode()


def cpu_per_call(work: Callable[[], object], calls: int) -> float:
    """CPU seconds of the calling thread per call: the request path (ONNX Runtime runs on it with
    one intra-op thread), not background threads (impression log, pool refresh, model reload)."""
    started = time.thread_time()
    for _ in range(calls):
        work()
    return (time.thread_time() - started) / calls


@dataclass(frozen=True)
class GateResult:
    ranker_cpu_ms: float
    reference_cpu_ms: float
    ratio: float
    baseline_ratio: float | None
    slowdown: float | None

    def line(self) -> str:
        return "CPU_GATE_JSON " + json.dumps(asdict(self))


def measure(
    rank_once: Callable[[], object], blocks: int = 7, calls: int = 150, warmup_s: float = 3.0
) -> GateResult:
    """Interleaved blocks of both workloads; the fastest block of each (the least disturbed).
    A freshly started ranker is slower for its first seconds (its background threads finish
    loading, caches fill): the warm-up keeps that out of the figure."""
    until = time.monotonic() + warmup_s
    while time.monotonic() < until:
        rank_once()
        reference_work()
    ranker, reference = [], []
    for _ in range(blocks):
        ranker.append(cpu_per_call(rank_once, calls))
        reference.append(cpu_per_call(reference_work, calls))
    ratio = min(ranker) / min(reference)
    baseline = json.loads(BASELINE.read_text())["ratio"] if BASELINE.exists() else None
    return GateResult(
        ranker_cpu_ms=round(min(ranker) * 1000, 4),
        reference_cpu_ms=round(min(reference) * 1000, 4),
        ratio=round(ratio, 3),
        baseline_ratio=baseline,
        slowdown=None if baseline is None else round(ratio / baseline, 3),
    )


def record_baseline(results: list[GateResult], commit: str) -> None:
    """The median ratio of several measurements: one measurement may land anywhere in the
    run-to-run spread (about +-20 % here), and a low baseline would make the gate fail by chance."""
    ratios = sorted(r.ratio for r in results)
    BASELINE.write_text(
        json.dumps({"ratio": float(np.median(ratios)), "measured": ratios, "commit": commit}, indent=1) + "\n"
    )
