"""Locust load for a running ranker: `make loadtest` (or `locust -f tests/load/locustfile.py`).

Simulated users are drawn as the simulated world draws them (shared/world): ids 0..n_users-1 from
config/data.yaml (`FEEDRANK_PROFILE` selects the profile), the users present when live traffic
begins, weighted by how many sessions a day each has. Each one, after a short think time, asks for
a feed of k = `api.default_k` (config/serving.yaml):

* mostly without candidates, so the ranker's candidate stage picks them from its Redis pools;
* sometimes with an explicit list of ~200 item ids, drawn from the catalog the world has published
  by then (within the logging policy's `candidate_max_age`);
* now and then a `/predict` of a dozen of those items.

A response is a failure unless it is a 200 with at most k items. Degraded answers (fallback) are
successes for Locust but counted apart. At exit one line sums the run:

    LOADTEST rps=... p50_ms=... p95_ms=... p99_ms=... requests=... failures=... degraded=...

Knobs (environment): FEEDRANK_LOADTEST_WAIT mean think time in seconds between one user's
requests (default 0.1; 0 = closed loop, as fast as answers come), FEEDRANK_LOADTEST_CANDIDATES
(default 200).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

from shared.config import load_data_config, load_serving_config
from shared.timeutil import duration_ms, to_ms
from shared.world import World

CONFIG_DIR = Path(os.environ.get("FEEDRANK_CONFIG_DIR", Path(__file__).resolve().parents[2] / "config"))
PROFILE = os.environ.get("FEEDRANK_PROFILE", "default")
WAIT_S = float(os.environ.get("FEEDRANK_LOADTEST_WAIT", "0.1"))
N_CANDIDATES = int(os.environ.get("FEEDRANK_LOADTEST_CANDIDATES", "200"))
PREDICT_ITEMS = 12
# Task weights: feeds without candidates, feeds with explicit candidates, /predict.
W_RANK, W_RANK_CANDIDATES, W_PREDICT = 75, 20, 5

_data = load_data_config(CONFIG_DIR, PROFILE)
_serving = load_serving_config(CONFIG_DIR, PROFILE)
_world = World.create(_data)
_live_ms = to_ms(_data.live_start)
USERS = _world.active_users(_live_ms)
USER_P = _world.user_activity[USERS] / _world.user_activity[USERS].sum()
ITEMS = _world.published_items(_live_ms, duration_ms(_data.traffic.candidate_max_age))
K = min(_serving.api.default_k, _serving.api.max_k)
N_CANDIDATES = min(N_CANDIDATES, ITEMS.size, _serving.api.max_candidates)

degraded = {"count": 0}


class FeedUser(FastHttpUser):
    """One simulated person scrolling: a feed now and then, occasionally a score request."""

    wait_time = between(WAIT_S / 2, WAIT_S * 1.5)

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        self.user_id = int(self.rng.choice(USERS, p=USER_P))

    def _rank(self, body: dict[str, Any], name: str) -> None:
        with self.rest("POST", "/rank", json=body, name=name) as resp:
            if resp.status_code != 200 or resp.js is None:
                return  # Locust records it as a failure
            items = resp.js.get("items", [])
            if len(items) > body["k"]:
                resp.failure(f"{len(items)} items for k={body['k']}")
            if resp.js.get("degraded"):
                degraded["count"] += 1

    @task(W_RANK)
    def feed(self) -> None:
        self._rank({"user_id": self.user_id, "k": K}, "/rank")

    @task(W_RANK_CANDIDATES)
    def feed_with_candidates(self) -> None:
        candidates = self.rng.choice(ITEMS, N_CANDIDATES, replace=False).tolist()
        self._rank({"user_id": self.user_id, "candidates": candidates, "k": K}, "/rank [candidates]")

    @task(W_PREDICT)
    def predict(self) -> None:
        item_ids = self.rng.choice(ITEMS, min(PREDICT_ITEMS, ITEMS.size), replace=False).tolist()
        with self.rest("POST", "/predict", json={"user_id": self.user_id, "item_ids": item_ids}) as resp:
            if resp.status_code != 200 or resp.js is None:
                return
            if len(resp.js.get("scores", [])) != len(item_ids):
                resp.failure("one score per item expected")


@events.quitting.add_listener
def _summary(environment: Environment, **_: Any) -> None:
    """One line with the figures that matter (milliseconds, whole run, every endpoint)."""
    total = environment.stats.total
    if total.num_requests == 0:
        print("LOADTEST no requests were made")
        return
    pct = {q: total.get_response_time_percentile(q) for q in (0.5, 0.95, 0.99)}
    print(
        f"LOADTEST rps={total.total_rps:.1f} p50_ms={pct[0.5]:.0f} p95_ms={pct[0.95]:.0f} "
        f"p99_ms={pct[0.99]:.0f} requests={total.num_requests} failures={total.num_failures} "
        f"degraded={degraded['count']}",
        flush=True,
    )
