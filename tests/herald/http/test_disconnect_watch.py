"""An SSE stream notices its client leaving without a task of its own (DisconnectWatch)."""

from __future__ import annotations

import asyncio

from herald.http.push import DisconnectWatch
from herald.hub import Subscriber
from tests.herald.http.harness import served, wait_until
from tests.support.sse import sse_connect


def _receive_until(gone: asyncio.Event) -> tuple[list[str], object]:
    seen: list[str] = []

    async def receive() -> dict[str, object]:
        if not seen:
            seen.append("http.request")
            await asyncio.sleep(0)  # a bare yield, as anyio's checkpoints do
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()  # a future, as uvicorn's receive waits on its message event
        seen.append("http.disconnect")
        return {"type": "http.disconnect"}

    return seen, receive


async def test_the_subscriber_is_closed_when_receive_says_disconnect() -> None:
    gone = asyncio.Event()
    seen, receive = _receive_until(gone)
    sub = Subscriber(8)
    DisconnectWatch(receive, sub)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert seen == ["http.request"] and not sub.closed
    gone.set()
    await wait_until(lambda: sub.closed)
    assert sub.reason == "client-gone" and seen == ["http.request", "http.disconnect"]


async def test_a_cancelled_watch_never_closes_the_subscriber() -> None:
    gone = asyncio.Event()
    _, receive = _receive_until(gone)
    sub = Subscriber(8)
    watch = DisconnectWatch(receive, sub)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    watch.cancel()
    gone.set()
    await asyncio.sleep(0.01)
    assert not sub.closed


async def test_a_client_that_goes_away_is_detached_before_any_heartbeat() -> None:
    async with served(heartbeat=60) as herald:
        token = herald.gateway.signer.issue(["news"])
        async with sse_connect(herald.client, f"/topics/news/events?token={token}") as stream:
            await stream.next_block()
            await wait_until(lambda: herald.gateway.hub.connections == 1)
        await wait_until(lambda: herald.gateway.hub.connections == 0, timeout=2)
        assert herald.gateway.hub.topic_count() == 0
