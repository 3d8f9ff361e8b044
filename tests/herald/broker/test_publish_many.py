"""publish_many: the same as publishing one by one, on both brokers (the Redis one pipelines it)."""

from __future__ import annotations

import pytest

from herald.broker import create_broker
from herald.protocol import Frame, parse_cursor
from tests.herald.broker.helpers import event, eventually


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def broker_url(request: pytest.FixtureRequest) -> str:
    """``memory://`` or the URL of the test session's Redis."""
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


async def test_publish_many_appends_to_each_history_in_order_and_fans_out(broker_url: str) -> None:
    broker = create_broker(broker_url, history_size=5)
    await broker.start()
    frames: list[Frame] = []
    broker.set_sink(frames.append)
    try:
        for topic in ("a", "b"):
            await broker.subscribe(topic)
        events = [event(n) for n in range(4)]
        cursors = await broker.publish_many([("a", events[0]), ("b", events[1]), ("a", events[2]), ("b", events[3])])
        assert len(cursors) == 4
        keys = [parse_cursor(c) for c in cursors]
        assert keys[0] < keys[2] and keys[1] < keys[3]
        for topic, numbers in (("a", [0, 2]), ("b", [1, 3])):
            page = await broker.read(topic, None)
            assert [s.event.data["n"] for s in page.events] == numbers
        await eventually(lambda: len(frames) == 4)
        assert [(f.topic, f.cursor) for f in frames] == list(zip("abab", cursors, strict=True))
        assert await broker.publish_many([]) == []
    finally:
        await broker.close()


@pytest.mark.redis
async def test_publish_many_loads_its_script_into_a_redis_that_lost_it(redis_url: str) -> None:
    broker = create_broker(redis_url)
    try:
        await broker._redis.script_flush()  # type: ignore[attr-defined]  # as after a restart without persistence
        [cursor] = await broker.publish_many([("a", event(1))])
        assert [s.cursor for s in (await broker.read("a", None)).events] == [cursor]
    finally:
        await broker.close()
