"""The WebSocket ``/ws``: subscribe, unsubscribe, ping, events, resume, commands, errors, close codes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from herald.events import build_event
from tests.herald.http.harness import LiveHerald


@contextlib.asynccontextmanager
async def ws_connect(live: LiveHerald, query: str = "", **options: Any) -> AsyncIterator[ClientConnection]:
    """A WebSocket to ``/ws?query`` (no compression, no proxy, bounded handshake)."""
    url = f"{live.ws_url}/ws" + (f"?{query}" if query else "")
    async with connect(url, open_timeout=5, close_timeout=2, compression=None, proxy=None, **options) as ws:
        yield ws


async def receive(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next message, decoded."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), "the server sends text messages only"
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


async def send(ws: ClientConnection, **message: Any) -> None:
    """Send a JSON message."""
    await ws.send(orjson.dumps(message).decode())


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason


async def publish(live: LiveHerald, topic: str, n: int, start: int = 0) -> list[str]:
    """Publish ``n`` events straight to the broker; their cursors."""
    return [await live.broker.publish(topic, build_event("Tick", {"n": start + i}, source="test")) for i in range(n)]


def token(live: LiveHerald, *topics: str) -> str:
    """A subscribe token for ``topics``."""
    return live.gateway.signer.issue(topics)


async def test_the_room_websocket_url_subscribes_at_once_and_delivers_events(live: LiveHerald) -> None:
    room = (await live.client.get("/chats/wsroom")).json()
    url = room["websocket_url"]
    assert url.startswith(f"{live.ws_url}/ws?topic=chats/wsroom&token=")
    async with connect(url, open_timeout=5, compression=None, proxy=None) as ws:
        assert await receive(ws) == {"type": "subscribed", "topic": "chats/wsroom", "cursor": "0-0", "id": None}
        posted = (await live.send(room="wsroom", text="over the socket")).json()
        frame = await receive(ws)
    assert frame["type"] == "event"
    assert frame["topic"] == "chats/wsroom"
    assert frame["event"]["type"] == "ChatMessageDelivered"
    assert frame["event"]["correlationid"] == posted["id"]
    assert frame["event"]["data"]["text"] == "over the socket"
    assert frame["cursor"]


async def test_subscribe_ping_unsubscribe(live: LiveHerald) -> None:
    async with ws_connect(live) as ws:
        await send(ws, type="subscribe", topic="chats/s", token=token(live, "chats/s"), id="sub-1")
        assert await receive(ws) == {"type": "subscribed", "topic": "chats/s", "cursor": "0-0", "id": "sub-1"}
        await send(ws, type="ping", id=42)
        assert await receive(ws) == {"type": "pong", "id": 42}
        (cursor,) = await publish(live, "chats/s", 1)
        event = await receive(ws)
        assert (event["type"], event["cursor"], event["event"]["data"]) == ("event", cursor, {"n": 0})
        await send(ws, type="unsubscribe", topic="chats/s", id="u")
        assert await receive(ws) == {"type": "unsubscribed", "topic": "chats/s", "id": "u"}
        await publish(live, "chats/s", 1, start=1)
        await send(ws, type="ping")
        assert await receive(ws) == {"type": "pong", "id": None}  # no event in between


async def test_two_topics_on_one_socket(live: LiveHerald) -> None:
    async with ws_connect(live, f"token={token(live, 'chats/x', 'chats/y')}") as ws:
        for topic in ("chats/x", "chats/y"):
            await send(ws, type="subscribe", topic=topic)
            assert (await receive(ws))["type"] == "subscribed"
        (x1,) = await publish(live, "chats/x", 1)
        (y1,) = await publish(live, "chats/y", 1, start=1)
        (x2,) = await publish(live, "chats/x", 1, start=2)
        frames = [await receive(ws) for _ in range(3)]
    assert [(f["topic"], f["cursor"], f["event"]["data"]["n"]) for f in frames] == [
        ("chats/x", x1, 0), ("chats/y", y1, 1), ("chats/x", x2, 2)
    ]


async def test_subscribe_with_a_cursor_resumes_right_after_it(live: LiveHerald) -> None:
    cursors = await publish(live, "chats/r", 3)
    async with ws_connect(live) as ws:
        await send(ws, type="subscribe", topic="chats/r", cursor=cursors[0], token=token(live, "chats/r"))
        assert await receive(ws) == {"type": "subscribed", "topic": "chats/r", "cursor": cursors[0], "id": None}
        replayed = [await receive(ws) for _ in range(2)]
        (later,) = await publish(live, "chats/r", 1, start=3)
        live_one = await receive(ws)
    assert [f["cursor"] for f in replayed] == cursors[1:]
    assert live_one["cursor"] == later


async def test_a_cursor_older_than_the_history_gets_a_gap_message(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    live = await make_live(history_size=2)
    cursors = await publish(live, "chats/g", 4)
    async with ws_connect(live) as ws:
        await send(ws, type="subscribe", topic="chats/g", cursor=cursors[0], token=token(live, "chats/g"))
        assert (await receive(ws))["type"] == "subscribed"
        gap = await receive(ws)
        kept = [await receive(ws) for _ in range(2)]
    assert gap["type"] == "gap"
    assert (gap["topic"], gap["cursor"], gap["oldest"]) == ("chats/g", cursors[0], cursors[2])
    assert [f["cursor"] for f in kept] == cursors[2:]


async def test_a_cursor_of_a_lost_history_is_subscribed_from_the_new_ones_start_after_a_gap(live: LiveHerald) -> None:
    cursors = await publish(live, "chats/lost", 2)
    lost = "99999999999999-0.zzzzzzzz"  # of a history chats/lost no longer has
    async with ws_connect(live) as ws:
        await send(ws, type="subscribe", topic="chats/lost", cursor=lost, token=token(live, "chats/lost"))
        subscribed, gap, *frames = [await receive(ws) for _ in range(4)]
    assert subscribed == {"type": "subscribed", "topic": "chats/lost", "cursor": "0-0", "id": None}
    assert (gap["type"], gap["cursor"], gap["oldest"]) == ("gap", lost, cursors[0])
    assert [f["cursor"] for f in frames] == cursors


async def test_an_operation_topic_replays_from_its_first_event(live: LiveHerald) -> None:
    posted = (await live.send(headers={"Prefer": "wait=5"})).json()
    async with connect(posted["websocket_url"], open_timeout=5, compression=None, proxy=None) as ws:
        assert (await receive(ws))["type"] == "subscribed"
        types = [(await receive(ws))["event"]["type"] for _ in range(3)]
    assert types == ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]


async def test_a_command_over_the_socket_is_answered_with_the_operation_body(live: LiveHerald) -> None:
    async with ws_connect(live) as ws:
        await send(ws, type="command", id=1, method="POST", path="/chats/lobby/messages",
                   body={"author": "ann", "text": "via ws"})
        reply = await receive(ws)
        assert (reply["type"], reply["id"], reply["status"]) == ("operation", 1, 202)
        operation = reply["operation"]
        assert operation["status"] == "pending"
        assert {"id", "operation_url", "subscribe_url", "websocket_url"} <= set(operation)
        await send(ws, type="command", id="w", method="post", path="/chats/lobby/messages",
                   headers={"Prefer": "wait=5", "Idempotency-Key": "ws-1"}, body={"author": "ann", "text": "wait"})
        waited = await receive(ws)
    assert (waited["status"], waited["operation"]["status"]) == (200, "succeeded")
    assert waited["operation"]["result"]["text"] == "wait"
    status = await live.client.get(operation["operation_url"], params={"view": "status"})
    assert status.json()["result"]["text"] == "via ws"


@pytest.mark.parametrize(
    ("command", "status", "kind"),
    [
        ({"method": "POST", "path": "/chats/lobby/messages", "body": {"author": "ann"}}, 422, "invalid-command"),
        ({"method": "POST", "path": "/nowhere", "body": {}}, 404, "no-such-command"),
        ({"method": "GET", "path": "/chats/lobby/messages"}, 404, "no-such-command"),
        ({"method": "POST", "path": "/chats/lobby/messages", "body": {"author": "a", "text": "t"},
          "headers": {"Idempotency-Key": "key\n"}}, 400, "bad-idempotency-key"),
    ],
)
async def test_a_bad_command_over_the_socket_gets_an_error_with_its_problem(
    live: LiveHerald, command: dict[str, Any], status: int, kind: str
) -> None:
    async with ws_connect(live) as ws:
        await send(ws, type="command", id=9, **command)
        reply = await receive(ws)
        assert (reply["type"], reply["id"], reply["status"]) == ("error", 9, status)
        assert reply["problem"]["type"].endswith("/" + kind)
        assert reply["problem"]["status"] == status
        await send(ws, type="ping")
        assert (await receive(ws))["type"] == "pong"  # the socket carries on


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"type":"dance"}', "unknown message type"),
        ('{"type":"subscribe"}', "needs a 'topic'"),
        ('{"type":"subscribe","topic":"chats/../x"}', "topic names are"),
        ('{"type":"subscribe","topic":"chats/a","cursor":"yesterday"}', "is not of the form"),
    ],
)
async def test_a_bad_message_gets_an_error_frame_and_the_socket_stays_open(
    live: LiveHerald, message: str, detail: str
) -> None:
    async with ws_connect(live) as ws:
        await ws.send(message)
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["code"] == "bad-message"
        assert detail in error["detail"]
        await send(ws, type="ping", id=1)
        assert await receive(ws) == {"type": "pong", "id": 1}


async def test_subscribe_errors_for_tokens_and_repeats(live: LiveHerald) -> None:
    async with ws_connect(live) as ws:
        await send(ws, type="subscribe", topic="chats/t", id=1)
        missing = await receive(ws)
        assert (missing["type"], missing["code"], missing["status"], missing["id"]) == ("error", "unauthorized", 401, 1)
        await send(ws, type="subscribe", topic="chats/t", id=2, token=token(live, "chats/other"))
        forbidden = await receive(ws)
        assert (forbidden["code"], forbidden["status"], forbidden["topic"]) == ("forbidden", 403, "chats/t")
        await send(ws, type="subscribe", topic="chats/t", id=3, token="forged.token.value")
        assert (await receive(ws))["status"] == 401
        await send(ws, type="subscribe", topic="chats/t", id=4, token=token(live, "chats/t"))
        assert (await receive(ws))["type"] == "subscribed"
        await send(ws, type="subscribe", topic="chats/t", id=5, token=token(live, "chats/t"))
        again = await receive(ws)
        assert (again["type"], again["code"], again["id"]) == ("error", "already-subscribed", 5)


async def test_a_url_topic_without_a_valid_token_closes_4401(live: LiveHerald) -> None:
    async with ws_connect(live, "topic=chats/secret&token=nope") as ws:
        code, _ = await closed_with(ws)
    assert code == 4401


async def test_a_binary_message_closes_1003(live: LiveHerald) -> None:
    async with ws_connect(live) as ws:
        await ws.send(b'{"type":"ping"}')
        code, reason = await closed_with(ws)
    assert code == 1003
    assert reason and "binary" in reason


async def test_an_oversize_message_closes_1009(make_live: Callable[..., Awaitable[LiveHerald]]) -> None:
    live = await make_live(max_ws_message=256)
    async with ws_connect(live) as ws:
        await send(ws, type="ping", id="x" * 300)
        code, reason = await closed_with(ws)
    assert code == 1009
    assert reason and "256" in reason


async def test_too_many_topics_closes_1008(make_live: Callable[..., Awaitable[LiveHerald]]) -> None:
    live = await make_live(max_topics_per_connection=1)
    async with ws_connect(live, f"token={token(live, 'chats/a', 'chats/b')}") as ws:
        await send(ws, type="subscribe", topic="chats/a")
        assert (await receive(ws))["type"] == "subscribed"
        await send(ws, type="subscribe", topic="chats/b")
        code, _ = await closed_with(ws)
    assert code == 1008


async def test_a_full_gateway_refuses_the_handshake_with_503(make_live: Callable[..., Awaitable[LiveHerald]]) -> None:
    live = await make_live(max_connections=1)
    async with ws_connect(live, f"topic=chats/a&token={token(live, 'chats/a')}") as first:
        assert (await receive(first))["type"] == "subscribed"
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(live):
                pass
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    assert orjson.loads(response.body)["type"].endswith("/too-many-connections")
