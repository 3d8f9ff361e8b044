"""Herald's WebSocket protocol (herald/http/fastwrite.py) in a real uvicorn: light idle sockets, direct frames.

An idle socket holds one task (uvicorn's, running the app) and no reader task; its receive queue and
write gate are the lazy ones; the handshake is let go once accepted; a live frame is written whole
by the hub, without websockets framing it again. Under uvicorn's own protocol the same socket works
through ASGI alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from websockets.asyncio.client import connect

from herald.events import build_event
from herald.http.fastwrite import FrameWriter, WebSocketProtocol, _Gate, _Inbox
from herald.hub import Subscriber
from tests.herald.http.harness import LiveHerald, wait_until


def sockets(live: LiveHerald) -> list[Subscriber]:
    """The hub's WebSocket subscribers."""
    return [s for s in live.gateway.hub._subscribers if s.transport == "ws"]


def readers() -> int:
    """Tasks reading a socket (``SocketSession._read``)."""
    return sum(1 for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "SocketSession._read")


async def open_socket(live: LiveHerald, topic: str) -> Any:
    """A client socket following ``topic``, once subscribed."""
    token = live.gateway.signer.issue([topic])
    ws = await connect(f"{live.ws_url}/ws?topic={topic}&token={token}", open_timeout=5, compression=None, proxy=None)
    assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
    await wait_until(lambda: len(sockets(live)) == 1)
    return ws


async def test_an_idle_socket_holds_no_reader_task_and_its_frames_are_written_whole(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    live = await make_live()
    ws = await open_socket(live, "chats/light")
    try:
        assert readers() == 0  # uvicorn's task runs the app; no reader task of our own
        [sub] = sockets(live)
        assert sub.direct is not None
        writer: FrameWriter = sub.direct.write  # type: ignore[attr-defined]
        protocol = writer._protocol
        assert isinstance(protocol, WebSocketProtocol) and WebSocketProtocol.light
        assert isinstance(protocol.queue, _Inbox) and isinstance(protocol.writable, _Gate)
        assert protocol.request is None and protocol.response is None  # let go once accepted
        framed: list[bytes] = []
        send_text = protocol.conn.send_text
        protocol.conn.send_text = lambda data, fin=True: (framed.append(data), send_text(data, fin))[1]  # type: ignore[method-assign]
        cursor = await live.broker.publish("chats/light", build_event("Tick", {"n": 1}, source="test"))
        message = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert message["cursor"] == cursor and message["event"]["data"] == {"n": 1}
        assert framed == []  # written whole by the hub, not framed by websockets for this socket
        await ws.send(orjson.dumps({"type": "ping", "id": 7}).decode())  # a message in: read without a task
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong", "id": 7}
    finally:
        await ws.close()
    await wait_until(lambda: not sockets(live))


async def test_under_uvicorns_own_protocol_a_socket_works_through_asgi(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    live = await make_live(ws="websockets-sansio")
    ws = await open_socket(live, "chats/plain")
    try:
        [sub] = sockets(live)
        assert sub.direct is None and readers() == 1
        await live.broker.publish("chats/plain", build_event("Tick", {"n": 2}, source="test"))
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["event"]["data"] == {"n": 2}
        await ws.send(orjson.dumps({"type": "ping", "id": 8}).decode())
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong", "id": 8}
    finally:
        await ws.close()
