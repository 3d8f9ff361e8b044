"""The Redis broker saving work: a burst of calls queues for a connection; known heads and operations are not read."""

from __future__ import annotations

import asyncio

import pytest

from herald.broker.redis import RedisBroker
from herald.operations import Operation, Status
from tests.herald.broker.helpers import command, event, eventually

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


async def test_the_head_of_a_followed_topic_is_known_without_asking_redis(redis_url: str) -> None:
    broker = RedisBroker(redis_url)
    got: list[str] = []
    broker.set_sink(lambda frame: got.append(frame.cursor))
    try:
        first = await broker.publish("followed", event(1))
        await broker.subscribe("followed")
        await broker.subscribe("empty")
        asked: list[str] = []
        read_head = broker._read_head

        async def counting(topic: str) -> str | None:
            asked.append(topic)
            return await read_head(topic)

        broker._read_head = counting  # type: ignore[method-assign]
        assert await broker.head("followed") == first  # the head read when it subscribed
        assert await broker.head("empty") is None
        second = await broker.publish("followed", event(2))
        await eventually(lambda: got == [second])
        assert await broker.head("followed") == second  # the newest handed over
        assert asked == []
        assert await broker.head("not-followed") is None and asked == ["not-followed"]
    finally:
        await broker.close()


async def test_a_transition_from_the_callers_copy_skips_the_read_and_a_stale_copy_is_read_again(
    redis_url: str,
) -> None:
    broker = RedisBroker(redis_url)
    try:
        operation, request = command()
        await broker.accept(operation, request)
        reads: list[str] = []
        get_operation = broker.get_operation

        async def counting(operation_id: str) -> Operation | None:
            reads.append(operation_id)
            return await get_operation(operation_id)

        broker.get_operation = counting  # type: ignore[method-assign]
        running = await broker.transition(operation.id, Status.RUNNING, current=operation)
        assert running.status is Status.RUNNING and reads == []
        await broker.request_cancel(operation.id)  # moves the version on: `running` is now stale
        reads.clear()
        done = await broker.transition(operation.id, Status.SUCCEEDED, result={"ok": 1}, current=running)
        assert done.status is Status.SUCCEEDED and done.cancel_requested and reads == [operation.id]
        stored = await get_operation(operation.id)
        assert stored is not None and stored.status is Status.SUCCEEDED and stored.result == {"ok": 1}
    finally:
        await broker.close()
