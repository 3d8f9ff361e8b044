"""A topic whose history was lost is a gap to a client resuming into it, never silence (issue 13, finding 15).

One gateway process on a real Redis. An SSE client and a WebSocket client read a room's events
and go away holding their cursors; the room's stream and its epoch key are deleted (what a
FLUSHALL, a failover to an empty replica or an eviction does to it); both come back with their
old cursors. Without epochs they were answered with silence: a cursor is "after" everything a
new history holds. Now each is told of the gap first, then gets the new history's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from herald.broker.redis import RedisBroker
from herald.events import build_event
from herald.protocol import split_cursor
from tests.herald.cluster.support import Cluster, token_for
from tests.support.sse import Block, sse_connect

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

TOPIC = "chats/amnesia"
GAP_DETAIL = "events after your cursor are no longer kept; some were missed"


@pytest.fixture
async def publisher() -> AsyncIterator[list[RedisBroker]]:
    """RedisBrokers the test publishes with, as a worker would; closed after it."""
    made: list[RedisBroker] = []
    yield made
    for broker in made:
        await broker.close()


async def sse_resume(url: str, cursor: str, count: int) -> list[Block]:
    """The first ``count`` messages of the room's SSE stream resumed after ``cursor``."""
    async with httpx.AsyncClient(base_url=url) as http, sse_connect(
        http, f"/topics/{TOPIC}/events", params={"token": token_for(TOPIC)}, headers={"Last-Event-ID": cursor}
    ) as stream:
        assert stream.response.status_code == 200
        return await stream.messages(count)


async def ws_resume(url: str, cursor: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` messages after subscribing to the room over WebSocket with ``cursor``."""
    async with connect(url + "/ws") as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "topic": TOPIC, "cursor": cursor,
                                    "token": token_for(TOPIC)}).decode())
        return [await receive(ws) for _ in range(count)]


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next message, within 5 s."""
    async with asyncio.timeout(5):
        message: dict[str, Any] = orjson.loads(await ws.recv())
        return message


async def test_clients_resuming_into_a_lost_history_get_a_gap_then_the_new_events(
    make_cluster: Callable[..., Cluster], publisher: list[RedisBroker]
) -> None:
    cluster = make_cluster()
    gateway = await cluster.gateway()
    publisher.append(RedisBroker(cluster.redis.url()))

    async def publish(numbers: range) -> list[str]:
        return [await publisher[0].publish(TOPIC, build_event("Tick", {"n": n}, source="test")) for n in numbers]

    before = await publish(range(3))
    sse_seen = await sse_resume(gateway.url, "0-0", 3)
    ws_seen = await ws_resume(gateway.ws_url, "0-0", 4)
    assert [b.id for b in sse_seen] == [m["cursor"] for m in ws_seen[1:]] == before
    sse_cursor, ws_cursor = sse_seen[-1].id, ws_seen[-1]["cursor"]
    assert sse_cursor is not None

    with cluster.client() as client:  # the history is lost while both are away
        assert client.delete(f"herald:topic:{{{TOPIC}}}", f"herald:epoch:{{{TOPIC}}}") == 2

    # Nothing published since: the history that cursor names is gone, and the client is told so. The
    # gap's id is "before the first event" of what comes next, so a resume from it does not repeat it.
    [gone] = await sse_resume(gateway.url, sse_cursor, 1)
    assert (gone.event, gone.id, gone.json()) == (
        "herald.gap", "0-0", {"topic": TOPIC, "cursor": sse_cursor, "oldest": None, "detail": GAP_DETAIL})

    after = await publish(range(3, 5))
    assert split_cursor(after[0])[1] != split_cursor(before[0])[1]  # a new history, a new epoch

    gap, *events = await sse_resume(gateway.url, sse_cursor, 3)
    assert (gap.event, gap.id, gap.json()) == (
        "herald.gap", "0-0", {"topic": TOPIC, "cursor": sse_cursor, "oldest": after[0], "detail": GAP_DETAIL})
    assert [(b.event, b.id, b.json()["data"]["n"]) for b in events] == [("Tick", after[0], 3), ("Tick", after[1], 4)]
    assert [b.id for b in await sse_resume(gateway.url, "0-0", 2)] == after  # from the gap's id: no second gap

    subscribed, gap_message, *frames = await ws_resume(gateway.ws_url, ws_cursor, 4)
    assert subscribed == {"type": "subscribed", "topic": TOPIC, "cursor": "0-0", "id": None}
    assert gap_message == {"type": "gap", "topic": TOPIC, "cursor": ws_cursor, "oldest": after[0],
                           "detail": GAP_DETAIL}
    assert [(f["type"], f["cursor"], f["event"]["data"]["n"]) for f in frames] == [
        ("event", after[0], 3), ("event", after[1], 4)]
