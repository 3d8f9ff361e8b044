"""1,000 operations through two gateways and two workers on a Redis Cluster (three masters, three replicas).

The single-Redis test (tests/herald/cluster/test_thousand_operations.py) on the cluster broker,
with the same run and checks (:func:`tests.herald.cluster.support.a_thousand_operations`):
clients POST to gateway A; each operation is followed over SSE on gateway B and over a WebSocket
on A; one multiplexed SSE stream on B follows every room, and the rooms are chosen so that each
master serves some of them (so each gateway holds a sharded pub/sub connection to every master).
Every operation must be handled by exactly one worker, through every shard of the request
stream, and every client must have received every event of what it followed, in order, once —
exactly what the cluster stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from herald.broker.slots import key_slot, shard_tags
from tests.herald.cluster.support import a_thousand_operations
from tests.herald.rediscluster.support import COMMAND_TYPE, Deployment, topics_on_every_master

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(240)]

OPERATIONS = 1000


async def test_a_thousand_operations_on_a_redis_cluster_each_handled_once_and_received_in_order(
    deploy: Callable[..., Deployment],
) -> None:
    deployment = deploy(HERALD_VISIBILITY_TIMEOUT="30")  # no faults: nothing is redelivered
    masters = topics_on_every_master(deployment.cluster, "chats/load", per_master=3)
    rooms = [t for ts in masters.values() for t in ts]
    a, b = await asyncio.gather(deployment.gateway(), deployment.gateway())
    workers = await asyncio.gather(deployment.worker(), deployment.worker())

    room_of = await a_thousand_operations(a, b, workers, rooms, deployment.stored, operations=OPERATIONS)

    nodes = [n for n in deployment.cluster.nodes() if n.master and n.slots]
    operation_masters = {next(n.port for n in nodes if n.serves(key_slot(f"herald:op:{{{topic}}}")))
                         for topic in room_of}
    assert operation_masters == set(masters), "the operations were spread over every master"
    # the requests went through every shard, and nothing is left queued or unacknowledged
    with deployment.client() as client:
        groups = {tag: client.xinfo_groups(f"herald:req:{{{tag}}}") for tag in shard_tags(COMMAND_TYPE, 4)}
    assert all(g and int(g[0]["entries-read"]) > OPERATIONS / 8 for g in groups.values()), groups
    assert deployment.queued() == (0, 0)
