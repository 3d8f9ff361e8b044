"""1,000 operations through two gateway processes, two worker processes and one Redis.

Clients POST to gateway A; each operation is followed over SSE on gateway B (its
``subscribe_url``, read to the end of the stream) and over a WebSocket on A (subscribed with
the token of its ``websocket_url``), and one multiplexed SSE stream on B follows every room.
Every operation must be handled by exactly one worker, and every client must have received
every event of the operations it followed, in order, once — exactly what Redis stored. The run
and those checks are :func:`tests.herald.cluster.support.a_thousand_operations`, shared with the
Redis Cluster's test (tests/herald/rediscluster/test_thousand_operations.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.herald.cluster.support import Cluster, a_thousand_operations, stored

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(240)]

OPERATIONS = 1000
ROOMS = 8


async def test_a_thousand_operations_each_handled_once_and_received_in_order_by_every_client(
    make_cluster: Callable[..., Cluster],
) -> None:
    # No faults here: a visibility timeout far above any job's duration, so nothing is redelivered.
    cluster = make_cluster(HERALD_VISIBILITY_TIMEOUT="30")
    a, b = await asyncio.gather(cluster.gateway(), cluster.gateway())
    workers = await asyncio.gather(cluster.worker(concurrency=8), cluster.worker(concurrency=8))
    rooms = [f"chats/load{n}" for n in range(ROOMS)]
    redis = cluster.client()

    await a_thousand_operations(a, b, workers, rooms, lambda topic: stored(redis, topic), operations=OPERATIONS)

    # nothing left queued or unacknowledged
    assert redis.xlen("herald:req:{ChatMessageSent}") == 0
    assert redis.xpending("herald:req:{ChatMessageSent}", "herald-workers")["pending"] == 0
