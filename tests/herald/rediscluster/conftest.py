"""Fixtures of the Redis Cluster tests: gateway and worker processes on the session's cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.herald.rediscluster.support import Deployment
from tests.support.redis_cluster import LocalCluster


@pytest.fixture
def deploy(redis_cluster_url: str, redis_cluster: LocalCluster) -> Iterator[Callable[..., Deployment]]:
    """Build a :class:`Deployment` on the (flushed) session cluster; its processes are stopped after the test, and
    the cluster is left whole. Their logs are printed at teardown, so pytest shows them when the test failed."""
    made: list[Deployment] = []

    def build(**env: Any) -> Deployment:
        made.append(Deployment(redis_cluster, **env))
        return made[-1]

    yield build
    for deployment in made:
        print(deployment.logs())
        deployment.close()
