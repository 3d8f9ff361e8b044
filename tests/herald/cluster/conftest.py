"""Fixtures of the multi-process tests: each test gets its own Redis and starts its own processes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.herald.cluster.support import Cluster
from tests.support.redis_server import REDIS_SERVER


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    """Build a :class:`Cluster` (own redis-server, own processes); all are stopped after the test.

    The processes' logs are printed at teardown, so pytest shows them when the test failed.
    """
    if not shutil.which(REDIS_SERVER):
        pytest.fail("redis-server is not installed: run the tests with `make test`, which installs it")
    made: list[Cluster] = []

    def build(**options: Any) -> Cluster:
        made.append(Cluster(**options))
        return made[-1]

    yield build
    for cluster in made:
        cluster.close()
        print(cluster.logs())
