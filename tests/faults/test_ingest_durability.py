"""Nothing acknowledged is lost: ingest killed (SIGKILL) or out of disk between claiming event ids
and writing the lake. Clients resend whatever was not answered 2xx, re-batched with new events (so
a resent body is a new batch, the hardest case for duplicate detection); at the end every event
answered 2xx is in the lake exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from fastapi.testclient import TestClient
from redis import Redis

from services.ingest.app import body_digest, create_app
from services.traffic.simulator import TrafficSimulator
from shared import keys
from shared.clock import FixedClock
from shared.config import load_data_config
from shared.lake import Lake
from shared.settings import REPO_CONFIG_DIR, Settings
from shared.timeutil import to_ms
from shared.world import World
from tests.faults.harness import Service, SlowProxy
from tests.support import free_port, serve_app

DATA = load_data_config(REPO_CONFIG_DIR, "tiny")
CLAIM_TTL_S = DATA.ingest.claim_ttl.total_seconds()
FOREVER_MS = 4_102_444_800_000
HOUR_MS = 3_600_000
BASE_MS = 1_767_312_000_000  # 2026-01-02T00:00:00Z: inside the tiny world's backfill days


def events(start: int, n: int, tag: str = "e") -> list[dict[str, Any]]:
    """Valid events spread over five hours (a batch writes several hour files); request ids that
    do not compress away, so that a small disk fills up after a few dozen batches."""
    return [
        {"event_id": f"{tag}{i}", "event_type": "impression", "user_id": i % 50, "item_id": i % 300,
         "request_id": hashlib.blake2b(str(i).encode(), digest_size=12).hexdigest(), "position": i % 10,
         "ts": BASE_MS + (i % 5) * HOUR_MS + i}
        for i in range(start, start + n)
    ]  # fmt: skip


def lake_ids(lake_path: Path) -> Counter[str]:
    return Counter(Lake(lake_path).read_events(0, FOREVER_MS, ["event_id"])["event_id"].to_pylist())


class Producer:
    """A careful client: keeps every event until it is answered 2xx (stored or duplicate) and
    resends the rest after any failure, reshuffled, so that a resent body is a different batch."""

    def __init__(self, url: str, batch: int, seed: int = 0) -> None:
        self.url, self.batch = url, batch
        self.rng = random.Random(seed)
        self.unacked: list[dict[str, Any]] = []
        self.acked: set[str] = set()
        self.outcomes: Counter[int | str] = Counter()
        self.sent = 0

    def send_once(self, timeout_s: float = 15) -> int | str:
        body = self.unacked[: self.batch]
        self.sent += 1
        try:
            response = requests.post(f"{self.url}/events", json=body, timeout=timeout_s)
        except requests.RequestException:
            outcome: int | str = "no answer"
        else:
            outcome = response.status_code
            if outcome == 200:
                self.acked |= {e["event_id"] for e in body}
                self.unacked = self.unacked[len(body) :]
        self.outcomes[outcome] += 1
        if outcome != 200:
            self.rng.shuffle(self.unacked)
        return outcome

    def drain(self, deadline_s: float) -> None:
        """Resend until everything is acknowledged (ingest may need a claim_ttl to settle)."""
        deadline = time.monotonic() + deadline_s
        while self.unacked:
            assert time.monotonic() < deadline, f"still unacknowledged: {len(self.unacked)}; {self.outcomes}"
            if self.send_once() != 200:
                time.sleep(0.5)


def ingest_service(env: dict[str, str], tmp_path: Path, **changes: str) -> Service:
    port = free_port()
    service_env = {k: v for k, v in {**env, **changes}.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return Service(
        "services.ingest", ["serve", "--port", str(port)], service_env, tmp_path / "ingest.log", port
    )


def assert_exactly_once(lake_path: Path, producer: Producer) -> Counter[str]:
    stored = lake_ids(lake_path)
    doubled = {i: n for i, n in stored.items() if n > 1}
    assert not doubled, f"{len(doubled)} events stored more than once, e.g. {list(doubled.items())[:5]}"
    missing = producer.acked - set(stored)
    assert not missing, f"{len(missing)} acknowledged events are not in the lake, e.g. {sorted(missing)[:5]}"
    return stored


# ----------------------------------------------------------------------------- keys and bodies


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_key_names_one_body(client: TestClient, settings: Settings) -> None:
    first = client.post("/events", json=events(0, 5), headers={"Idempotency-Key": "k1"})
    other = client.post("/events", json=events(5, 5), headers={"Idempotency-Key": "k1"})
    again = client.post("/events", json=events(0, 5), headers={"Idempotency-Key": "k1"})
    assert first.status_code == 200
    assert other.status_code == 409
    assert "different body" in other.json()["detail"]
    assert again.status_code == 200
    assert (again.json()["stored"], again.json()["duplicates"]) == (0, 5)
    assert set(lake_ids(settings.lake_path)) == {f"e{i}" for i in range(5)}  # the file was not replaced


def test_a_retry_without_a_key_is_recognised_by_its_body(client: TestClient, settings: Settings) -> None:
    body = events(0, 8)
    first = client.post("/events", json=body).json()
    again = client.post("/events", json=body).json()
    assert first["batch_id"] == again["batch_id"]
    assert (first["stored"], again["stored"], again["duplicates"]) == (8, 0, 8)
    assert lake_ids(settings.lake_path) == Counter({f"e{i}": 1 for i in range(8)})


def test_a_batch_that_could_not_write_the_lake_loses_nothing(client: TestClient, settings: Settings) -> None:
    """The lake write fails after the ids were claimed (here: a file where a partition directory
    must go). Nothing is acknowledged; the same events resent in another batch are stored once the
    failed batch's claims expire (its files do not hold them), the others at once."""
    blocker = settings.lake_path / "events" / "date=2026-01-02"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    failed = client.post("/events", json=events(0, 10))
    assert failed.status_code == 503
    assert failed.headers["retry-after"] == "1"
    blocker.unlink()
    rebatched = events(0, 10) + events(10, 5)
    busy = client.post("/events", json=rebatched)
    assert busy.status_code == 409  # the failed batch may still be running: retry later
    assert busy.headers["retry-after"] == "1"
    time.sleep(CLAIM_TTL_S + 0.5)
    stored = client.post("/events", json=rebatched).json()
    assert (stored["stored"], stored["duplicates"]) == (15, 0)
    assert lake_ids(settings.lake_path) == Counter({f"e{i}": 1 for i in range(15)})


# ----------------------------------------------------------------------------- crashes


def test_sigkill_after_the_lake_write_before_the_commit(
    service_env: dict[str, str], tmp_path: Path, redis_base_url: str
) -> None:
    """The lake holds the batch but its commit never happened: the store Redis stalls while ingest
    publishes (between the lake write and the commit), and ingest is killed there. A different
    batch with those events later finds them in the dead batch's files: duplicates, not stored twice."""
    store_port = int(redis_base_url.rsplit(":", 1)[1])
    proxy = SlowProxy(store_port)
    service = ingest_service(service_env, tmp_path, FEEDRANK_FEATURE_STORE_URL=proxy.url(2))
    lake_path = Path(service_env["FEEDRANK_LAKE_PATH"])
    try:
        service.start()
        first = events(0, 20)
        proxy.stall()
        answer: list[Any] = []
        sender = threading.Thread(
            target=lambda: answer.append(_post_or_none(f"{service.url}/events", first)), daemon=True
        )
        sender.start()
        deadline = time.monotonic() + 20
        while not proxy.held:  # ingest reached the publish step: its lake files are written
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.02)
        digest = body_digest(_json_bytes(first))
        assert len(list((lake_path / "events").rglob(f"part-{digest}.parquet"))) == 5  # one per hour
        service.kill()
        sender.join(20)
        assert answer == [None]  # never acknowledged
        proxy.resume()
        service.start()
        time.sleep(CLAIM_TTL_S + 0.5)  # the dead batch's claims expire
        report = requests.post(f"{service.url}/events", json=events(0, 20) + events(20, 5), timeout=15).json()
        assert (report["stored"], report["duplicates"]) == (5, 20)
        assert lake_ids(lake_path) == Counter({f"e{i}": 1 for i in range(25)})
        print(
            f"FAULT sigkill_after_lake_write requests=2 events=25 errors_5xx=0 lost=0 doubled=0 recovery_s={CLAIM_TTL_S:.0f}"
        )
    finally:
        service.stop()
        proxy.close()


def _json_bytes(document: Any) -> bytes:
    return requests.Request("POST", "http://x", json=document).prepare().body  # type: ignore[return-value]


def _post_or_none(url: str, body: Any) -> int | None:
    try:
        return requests.post(url, json=body, timeout=30).status_code
    except requests.RequestException:
        return None


def test_random_sigkills_under_load_lose_nothing(service_env: dict[str, str], tmp_path: Path) -> None:
    """Ingest is killed (SIGKILL) at seeded random moments while a client streams batches; after
    each kill it is restarted. Wherever a kill lands (parsing, claiming, writing, publishing,
    committing), every acknowledged event ends up in the lake exactly once."""
    rng = random.Random(13)
    service = ingest_service(service_env, tmp_path)
    lake_path = Path(service_env["FEEDRANK_LAKE_PATH"])
    producer = Producer("", batch=200, seed=1)
    stop = threading.Event()
    kills, started = 4, time.monotonic()
    try:
        service.start()
        producer.url = service.url

        def stream() -> None:
            n = 0
            while not stop.is_set():
                producer.unacked += events(n, 100)
                n += 100
                if producer.send_once(timeout_s=5) != 200:
                    time.sleep(0.2)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.5, 2.0))
            service.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            service.start()
        stop.set()
        thread.join(30)
        producer.drain(deadline_s=60)
        stored = assert_exactly_once(lake_path, producer)
    finally:
        service.stop()
    assert len(stored) == len(producer.acked) > 1000
    failures = sum(n for outcome, n in producer.outcomes.items() if outcome != 200)
    print(
        f"FAULT random_sigkill kills={kills} requests={producer.sent} events={len(producer.acked)} "
        f"failed_requests={failures} errors_5xx={sum(n for o, n in producer.outcomes.items() if isinstance(o, int) and o >= 500)} "
        f"lost=0 doubled=0 seconds={time.monotonic() - started:.1f} outcomes={dict(producer.outcomes)}"
    )


# ----------------------------------------------------------------------------- disk full


@pytest.fixture
def small_lake(service_env: dict[str, str]) -> Iterator[Path]:
    """The lake on a 1 MB tmpfs (needs root: mount)."""
    path = Path(service_env["FEEDRANK_LAKE_PATH"])
    path.mkdir(parents=True, exist_ok=True)
    if (
        not shutil.which("mount")
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full test needs a small filesystem")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_loses_nothing(service_env: dict[str, str], tmp_path: Path, small_lake: Path) -> None:
    """The lake fills up (ENOSPC) mid-stream: ingest answers 503 and acknowledges nothing it could
    not write; once there is room again, the resent events are stored exactly once."""
    service = ingest_service(service_env, tmp_path)
    producer = Producer("", batch=500, seed=2)
    try:
        service.start()
        producer.url = service.url
        n = 0
        while not producer.outcomes[503]:
            producer.unacked += events(n, 500)
            n += 500
            producer.send_once()
            assert n < 100_000, f"the 1 MB lake never filled up: {producer.outcomes}"
        for _ in range(3):  # the disk stays full: nothing more is acknowledged
            assert producer.send_once() in (409, 503)
        assert "No space left on device" in service.tail(200)
        filled_at = time.monotonic()
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_lake)], check=True)
        producer.drain(deadline_s=60)
        recovered_s = time.monotonic() - filled_at
        stored = assert_exactly_once(small_lake, producer)
    finally:
        service.stop()
    assert len(stored) == n
    print(
        f"FAULT disk_full requests={producer.sent} events={n} refused_503={producer.outcomes[503]} "
        f"refused_409={producer.outcomes[409]} "
        f"errors_500={producer.outcomes[500]} lost=0 doubled=0 recovery_s={recovered_s:.1f}"
    )
    assert producer.outcomes[500] == 0


def test_the_traffic_simulator_resends_a_failed_batch_unchanged(settings: Settings) -> None:
    """Ingest fails a batch mid-way (503): the simulator keeps it and resends it with the same
    Idempotency-Key and body; the events end up in the lake once."""
    data = settings.data_config()
    clock = FixedClock(to_ms(data.live_start))
    blocker = settings.lake_path / "events" / "date=2026-01-02"
    with serve_app(create_app(settings)) as url:
        simulator = TrafficSimulator(
            World.create(data), clock, settings.serving_config().traffic, "http://unused", url
        )
        simulator._hold(events(0, 30))
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a directory")

        async def flush() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                await simulator.flush(client)

        asyncio.run(flush())
        assert simulator.stats.events_posted == 0
        ((key, kept),) = simulator._unsent
        blocker.unlink()
        asyncio.run(flush())  # within claim_ttl: the same key is the same batch, its own claims
    assert simulator._unsent == []
    assert (simulator.stats.events_posted, simulator.stats.events_resent) == (30, 1)
    assert sorted(e["event_id"] for e in kept) == sorted(f"e{i}" for i in range(30))
    assert Redis.from_url(str(settings.queue_url)).exists(keys.ingest_body("events", key))  # sent as a key
    assert lake_ids(settings.lake_path) == Counter({f"e{i}": 1 for i in range(30)})
