"""The fault suite: every test here injects a fault (bad input, a dependency that stops, stalls or
fills up, a killed process) and checks that nothing acknowledged is lost and no 5xx escapes.

Every test in this directory is marked `faults` (run them alone with `pytest -m faults`) and
`integration`; they run in `make test` too. They share one trained tiny world (package scope).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TrainedWorld, build_trained_world

FAULTS_QUEUE_DB, FAULTS_STORE_DB = 8, 9  # 1-2: redis_pair, 3-4: trained_world, 5-6: the scenario
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="package")
def faults_world(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedWorld]:
    with build_trained_world(
        redis_base_url, tmp_path_factory.mktemp("faults-world"), FAULTS_QUEUE_DB, FAULTS_STORE_DB
    ) as world:
        yield world
