"""Workers on a Redis Cluster: every request shard read in turn, and the single-Redis redelivery rules kept.

A worker (herald.worker.Worker, in this process) on the cluster broker takes requests from every
shard of its event types, none left behind by a busier one; a request whose worker died is handed
out again after the visibility timeout, with its delivery counted; and a request handed out
``max_attempts`` times ends its operation as ``failed`` (``attempts-exhausted``), as on one Redis.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from herald.broker.cluster import ClusterBroker
from herald.operations import Status
from herald.worker import Context, Retry, Worker
from tests.herald.broker.helpers import REQUEST, command

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

VISIBILITY = 0.3


@pytest.fixture
async def brokers(redis_cluster_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Started cluster brokers of this process, closed after the test."""
    made: list[ClusterBroker] = []

    async def make(**options: Any) -> ClusterBroker:
        broker = ClusterBroker(redis_cluster_url, **{"visibility_timeout": VISIBILITY, **options})
        await broker.start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


async def test_a_consumer_takes_from_every_shard_in_turn_however_deep_one_of_them_is(
    brokers: Callable[..., Any],
) -> None:
    broker = await brokers(shards=4)
    shards = broker.shard_keys(REQUEST)
    spread = iter(range(10**6))

    async def queue_on(index: int) -> None:
        broker._request_stream = lambda _type, _slot: asyncio.sleep(0, shards[index])  # type: ignore[method-assign]
        await broker.accept(*command(n=next(spread)))

    for _ in range(20):  # a backlog on the first shard
        await queue_on(0)
    for index in (1, 2, 3):
        await queue_on(index)
    taken: list[str] = []
    for _ in range(4):
        [delivery] = await broker.consume([REQUEST], "w", count=1, block=1)
        taken.append(delivery.delivery_id.rsplit("|", 1)[0])
        await broker.ack(delivery)
    assert collections.Counter(taken) == collections.Counter(t.removeprefix("herald:req:{").removesuffix("}")
                                                             for t in shards), taken


async def test_a_request_whose_worker_died_is_run_again_and_given_up_after_max_attempts(
    brokers: Callable[..., Any],
) -> None:
    broker = await brokers()
    runs: list[int] = []

    async def handler(ctx: Context) -> None:
        runs.append(ctx.operation.attempts)
        raise Retry()  # never finishes: handed out again each time

    op, request = command()
    await broker.accept(op, request)
    # a worker that takes it, moves it to running and dies: no ack, no release
    [lost] = await broker.consume([REQUEST], "doomed", count=1, block=1)
    await broker.transition(op.id, Status.RUNNING, current=lost.operation)
    worker = Worker(broker, {REQUEST: handler}, name="survivor", max_attempts=3, poll=0.2)
    running = asyncio.ensure_future(worker.run())
    try:
        for _ in range(400):  # 20 s at most
            stored = await broker.get_operation(op.id)
            if stored is not None and stored.status.terminal:
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await running
    assert stored is not None and stored.status is Status.FAILED
    assert stored.error is not None and stored.error["type"].endswith("/attempts-exhausted")
    assert runs == [2, 3]  # the dead worker's was attempt 1; the survivor ran 2 and 3, then gave up
    assert stored.attempts == 3 and stored.error["attempts"] == 3
    assert await broker.consume([REQUEST], "anyone", block=VISIBILITY * 2) == []
