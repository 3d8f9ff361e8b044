"""The Redis broker under a burst of concurrent calls: they queue for a connection, none is refused."""

from __future__ import annotations

import asyncio

import pytest

from app.broker.redis import RedisBroker
from tests.broker.helpers import event

pytestmark = pytest.mark.redis


async def test_a_burst_of_concurrent_calls_waits_for_a_connection_instead_of_failing(redis_url: str) -> None:
    # redis-py's default pool raised "Too many connections" past 100 calls in flight, and every SSE
    # client connecting during such a burst got a 503 (seen by the benchmark with 1,000 subscribers)
    broker = RedisBroker(redis_url, max_connections=4)
    try:
        await broker.publish("burst", event(1))
        heads = await asyncio.gather(*(broker.head("burst") for _ in range(300)))
        assert len(set(heads)) == 1 and heads[0] is not None
    finally:
        await broker.close()
