"""The stack's Redis users (compose.yaml, `configs`) on a real redis-server: each role can do what
its code does, with the key names of shared/keys.py, and nothing it must not (least privilege)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from redis import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from shared import keys
from shared.config import load_data_config
from shared.features import FeatureSpec
from shared.featurestore import FeatureStore
from shared.settings import REPO_CONFIG_DIR
from tests.support import free_port

pytestmark = pytest.mark.integration

COMPOSE = REPO_CONFIG_DIR.parent / "compose.yaml"
PASSWORDS = {
    "QUEUE_REDIS_PASSWORD": "queue-secret",
    "STORE_REDIS_PASSWORD": "store-secret",
    "RANKER_REDIS_PASSWORD": "ranker-secret",
    "TRAFFIC_REDIS_PASSWORD": "traffic-secret",
}
HOUR, MINUTE = timedelta(hours=1), timedelta(minutes=1)
RQ_QUEUE = "rq:queue:features"
"""A key of the job queue (RQ's naming): only the roles that own the data may touch it."""


def acl_file(name: str) -> str:
    """compose.yaml's ACL content for one Redis, with the .env variables filled in."""
    content: str = yaml.safe_load(COMPOSE.read_text())["configs"][name]["content"]
    return re.sub(r"\$\{([A-Z_]+)[^}]*\}", lambda m: PASSWORDS[m.group(1)], content)


@contextmanager
def redis_with_users(name: str) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="feedrank-acl-") as tmp:
        users = Path(tmp) / "users.acl"
        users.write_text(acl_file(name))
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp, "--aclfile", str(users)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    Redis(port=port, password=PASSWORDS["QUEUE_REDIS_PASSWORD"]).ping()
                    break
                except AuthenticationError:
                    break  # up, with other passwords
                except Exception:
                    assert process.poll() is None, "redis-server refused the ACL file"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
            yield port
        finally:
            process.terminate()
            process.wait(10)


def as_user(port: int, user: str, password_env: str) -> Redis:
    return Redis(port=port, username=user, password=PASSWORDS[password_env])


def refused(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except NoPermissionError:
        return True
    return False


def test_on_the_queue_the_ranker_logs_impressions_and_reads_the_clock_only() -> None:
    with redis_with_users("queue-redis-users") as port:
        owner = as_user(port, "default", "QUEUE_REDIS_PASSWORD")
        ranker = as_user(port, "ranker", "RANKER_REDIS_PASSWORD")
        assert ranker.set(keys.CLOCK_ANCHOR, "1.0", nx=True)
        assert ranker.get(keys.CLOCK_ANCHOR) == b"1.0"
        assert ranker.xadd(keys.SERVED_STREAM, {"request_id": "r1"})
        assert owner.xlen(keys.SERVED_STREAM) == 1
        assert refused(lambda: ranker.lpush(RQ_QUEUE, "job"))
        assert refused(lambda: ranker.get(keys.WORLD_DRIFT))
        assert refused(lambda: ranker.xtrim(keys.SERVED_STREAM, maxlen=0))
        assert refused(ranker.flushall)
        assert refused(lambda: ranker.delete(keys.SERVED_STREAM))


def test_the_traffic_simulator_never_touches_the_queue() -> None:
    with redis_with_users("queue-redis-users") as port:
        owner = as_user(port, "default", "QUEUE_REDIS_PASSWORD")
        owner.lpush(RQ_QUEUE, "job")
        traffic = as_user(port, "traffic", "TRAFFIC_REDIS_PASSWORD")
        assert traffic.set(keys.CLOCK_ANCHOR, "1.0", nx=True)
        assert traffic.set(keys.WORLD_DRIFT, "{}")
        assert traffic.get(keys.WORLD_DRIFT) == b"{}"
        assert traffic.delete(keys.WORLD_DRIFT) == 1
        assert refused(lambda: traffic.lrange(RQ_QUEUE, 0, -1))
        assert refused(lambda: traffic.delete(RQ_QUEUE))
        assert refused(lambda: traffic.xadd(keys.SERVED_STREAM, {"request_id": "forged"}))
        assert refused(lambda: traffic.get(keys.pipeline_lock("train")))
        assert refused(traffic.flushall)
        assert owner.llen(RQ_QUEUE) == 1


def test_the_owners_of_the_data_cannot_wipe_or_reconfigure_a_server() -> None:
    with redis_with_users("queue-redis-users") as port:
        owner = as_user(port, "default", "QUEUE_REDIS_PASSWORD")
        assert owner.lpush(RQ_QUEUE, "job") == 1
        assert refused(owner.flushall)
        assert refused(owner.flushdb)
        assert refused(lambda: owner.config_set("requirepass", ""))
        assert refused(lambda: owner.acl_setuser("intruder", enabled=True))
        assert owner.llen(RQ_QUEUE) == 1
        with pytest.raises(AuthenticationError):
            Redis(port=port, password="change-me-queue").ping()


def test_in_the_online_store_the_ranker_reads_features_and_writes_only_its_scratch_keys() -> None:
    spec = FeatureSpec.from_config(load_data_config(REPO_CONFIG_DIR, "tiny"))
    with redis_with_users("store-redis-users") as port:
        owner = as_user(port, "default", "STORE_REDIS_PASSWORD")
        ranker = as_user(port, "ranker", "RANKER_REDIS_PASSWORD")
        FeatureStore(owner, HOUR, MINUTE).publish(
            spec,
            1_000,
            np.array([7]),
            np.ones((1, len(spec.user_fields))),
            np.array([1, 2]),
            np.full((2, len(spec.item_fields)), 2.0),
        )
        owner.zadd(keys.popular_bucket(0), {"1": 3.0, "2": 1.0})
        fetched = FeatureStore(ranker, HOUR, MINUTE).fetch(spec, 7, [1, 2], with_engaged=True)
        assert fetched.snapshot_id is not None
        assert np.all(fetched.items == 2.0)
        scratch = keys.candidate_scratch("t")
        with ranker.pipeline(transaction=False) as pipe:  # the candidate stage's trending pool
            pipe.zunionstore(scratch, [keys.popular_bucket(0)])
            pipe.zrange(scratch, 0, 0, desc=True)
            pipe.delete(scratch)
            assert pipe.execute()[1] == [b"1"]
        current = keys.features_current(spec.version)
        assert refused(lambda: ranker.set(current, "forged"))
        assert refused(lambda: ranker.delete(current))
        assert refused(lambda: ranker.zadd(keys.popular_bucket(0), {"9": 99.0}))
        assert refused(ranker.flushall)
        assert refused(lambda: ranker.keys("*"))
        with pytest.raises(AuthenticationError):
            as_user(port, "traffic", "TRAFFIC_REDIS_PASSWORD").ping()
