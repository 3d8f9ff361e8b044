"""A gateway process SIGKILLed: its SSE clients resume on the other one with ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.herald.cluster.support import Cluster, SSEListener, eventually, stored

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(120)]

TERMINAL = ("herald.operation.succeeded", "herald.operation.failed", "herald.operation.canceled")


async def test_sse_clients_of_a_killed_gateway_resume_on_the_other_and_get_exactly_what_they_missed(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    a, b = await asyncio.gather(cluster.gateway(), cluster.gateway())
    await cluster.worker("tests.herald.cluster.handlers:FaultSettings")
    room = "chats/failover"
    room_sse = SSEListener([a.url, b.url], [room]).start()  # A first; B when A does not answer
    await eventually(lambda: bool(room_sse.connects), 10, "the room stream opened on A")

    async with httpx.AsyncClient(base_url=b.url) as http:

        async def send(text: str) -> str:
            response = await http.post(f"/{room}/messages", json={"author": "ann", "text": text})
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        for n in range(5):
            await send(f"before {n}")
        await eventually(lambda: len(room_sse.all) == 5, 10, "five messages on A")
        # an operation in flight when A dies, followed on A from its first event
        op_id = await send("sleep 1.5")
        op_sse = SSEListener([a.url, b.url], [f"operations/{op_id}"],
                             end_on=lambda s: any(e.type in TERMINAL for e in s.all)).start()
        await eventually(lambda: len(op_sse.all) >= 2, 10, "the operation running, seen on A")

        await asyncio.to_thread(a.kill)
        for n in range(5):
            await send(f"after {n}")

    await eventually(lambda: len(room_sse.all) >= 11 and op_sse.done, 15, "both streams resumed on B and caught up")
    await asyncio.sleep(0.3)  # a duplicate would arrive now
    with cluster.client() as redis:
        room_history = stored(redis, room)
        op_history = stored(redis, f"operations/{op_id}")
    assert len(room_history) == 11

    for listener, history in ((room_sse, room_history), (op_sse, op_history)):
        print(f"{listener.topics[0]}: connects (gateway, status, Last-Event-ID, events before) {listener.connects}")
        assert listener.connects[0][:2] == (a.url, 200)
        [(_, status, resumed_from, before)] = [c for c in listener.connects if c[0] == b.url]
        assert status == 200 and resumed_from == listener.all[before - 1].cursor, "resumed with the last id A sent"
        got_on_a, got_on_b = listener.all[:before], listener.all[before:]
        assert [e.cursor for e in got_on_a] == [e.cursor for e in history[:before]]
        assert [e.cursor for e in got_on_b] == [e.cursor for e in history[before:]], "B sent exactly what was missed"
        assert got_on_b, "something was missed while A was gone"
        assert not listener.controls, "no gap: everything missed was still in the history"
    assert [e.type for e in op_sse.all if e.type in TERMINAL] == ["herald.operation.succeeded"]
    await room_sse.close()
    await op_sse.close()
