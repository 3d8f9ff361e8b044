"""Fixtures shared by the whole test suite live here; keep each one generic and small.

Redis: one private ``redis-server`` per test session on a free loopback port (never a Redis
that was already running), emptied before every test that asks for ``redis_url``; and, for the
tests that ask for it, one private Redis Cluster (six nodes: three masters, three replicas),
emptied before every test that asks for ``redis_cluster_url``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support.redis_cluster import REDIS_CLI, LocalCluster
from tests.support.redis_server import REDIS_SERVER, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server started once for the session and stopped at its end."""
    if not shutil.which(REDIS_SERVER):
        pytest.fail("redis-server is not installed: run the tests with `make test`, which installs it")
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of database 0 of the session's Redis, flushed for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url(0)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A Redis Cluster formed once for the session (about 3 s) and stopped at its end.

    Tests that kill or move its nodes leave it whole again (:meth:`LocalCluster.heal`).
    """
    if not (shutil.which(REDIS_SERVER) and shutil.which(REDIS_CLI)):
        pytest.fail("redis-server or redis-cli is not installed: run the tests with `make test`, which installs them")
    cluster = LocalCluster().start()
    yield cluster
    cluster.cleanup()


@pytest.fixture
def redis_cluster_url(redis_cluster: LocalCluster) -> str:
    """The ``redis+cluster://`` URL of the session's cluster, every master flushed for this test."""
    redis_cluster.heal()
    redis_cluster.flush()
    return redis_cluster.url
