"""Sharded fan-out: a gateway holds one pub/sub connection per master, subscribed to only what its clients follow.

SSE clients of one gateway follow topics whose slots are served by each of the three masters;
events published to them (as a worker publishes: the append script ``SPUBLISH``-es on the topic's
master) reach exactly their followers, and each master sees one sharded subscriber connection
from the gateway, holding just the topics followed there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from herald.broker.cluster import ClusterBroker
from herald.events import build_event
from tests.herald.cluster.support import SSEListener, eventually
from tests.herald.rediscluster.support import Deployment, topics_on_every_master

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.fixture
async def publisher(redis_cluster_url: str) -> AsyncIterator[ClusterBroker]:
    """A cluster broker of the test process, to publish as a worker would."""
    broker = ClusterBroker(redis_cluster_url)
    await broker.start()
    yield broker
    await broker.close()


def sharded_clients(deployment: Deployment, port: int) -> list[int]:
    """The ``ssub`` count of each connection of the master on ``port`` that holds sharded subscriptions."""
    with deployment.cluster.client(port) as client:
        raw: Any = client.execute_command("CLIENT", "LIST")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    counts = [int(field.split("=")[1]) for line in text.splitlines() for field in line.split()
              if field.startswith("ssub=")]
    return [c for c in counts if c > 0]


async def test_one_gateway_subscribes_each_master_once_for_just_the_topics_its_clients_follow(
    deploy: Callable[..., Deployment], publisher: ClusterBroker
) -> None:
    deployment = deploy()
    masters = topics_on_every_master(deployment.cluster, "chats/spread", per_master=3)
    gateway = await deployment.gateway()
    listeners = {t: SSEListener([gateway.url], [t]).start() for ts in masters.values() for t in ts}
    await eventually(lambda: all(listener.connects for listener in listeners.values()), 10, "every stream opened")
    await eventually(lambda: all(sharded_clients(deployment, port) == [3] for port in masters), 10,
                     "one connection per master, subscribed to its three topics")

    sent = {t: [await publisher.publish(t, build_event("Tick", {"topic": t, "n": n}, source="test"))
                for n in range(3)] for t in listeners}
    await eventually(lambda: all(len(listener.all) == 3 for listener in listeners.values()), 10,
                     "each stream got its topic's events")
    for topic, listener in listeners.items():
        assert [e.cursor for e in listener.all] == sent[topic]
        assert {e.event["data"]["topic"] for e in listener.all} == {topic}

    # the clients of one master's topics leave: that master's connection holds no subscription any more
    port, gone = next(iter(masters.items()))
    for topic in gone:
        await listeners.pop(topic).close()
    await eventually(lambda: sharded_clients(deployment, port) == [], 10, "the topics unsubscribed")
    assert all(sharded_clients(deployment, p) == [3] for p in masters if p != port)
    for listener in listeners.values():
        await listener.close()
    await asyncio.sleep(0)
