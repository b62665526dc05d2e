"""Fixtures for integration tests that need a trained, registered model (built once per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import TrainedWorld, build_trained_world

WORLD_QUEUE_DB, WORLD_STORE_DB = 3, 4

__all__ = ["TrainedWorld", "trained_world"]


@pytest.fixture(scope="module")
def trained_world(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedWorld]:
    with build_trained_world(
        redis_base_url, tmp_path_factory.mktemp("trained-world"), WORLD_QUEUE_DB, WORLD_STORE_DB
    ) as world:
        yield world
