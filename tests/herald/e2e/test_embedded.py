"""End to end on the embedded default: curl, an SSE client, a WebSocket client, Prefer: wait.

Everything goes over real sockets to ``uvicorn app.main:create_app --factory`` in its own process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.support.server import HeraldServer
from tests.support.sse import Block, sse_connect

pytestmark = pytest.mark.e2e


def curl(*args: str, timeout: float = 10.0) -> str:
    """Run curl and return its stdout; fails the test if curl fails."""
    done = subprocess.run(["curl", "--silent", "--show-error", "--max-time", str(timeout), *args],
                          capture_output=True, text=True, timeout=timeout + 5)
    assert done.returncode == 0, done.stderr
    return done.stdout


def split_response(raw: str) -> tuple[int, dict[str, str], str]:
    """Status code, headers (lower-case names) and body of one ``curl -i`` response."""
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.split("\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def post_message(server: HeraldServer, room: str, text: str, *headers: str) -> tuple[int, dict[str, str], str]:
    """POST a chat message with curl -i."""
    extra = [arg for header in headers for arg in ("-H", header)]
    return split_response(curl("-i", "-X", "POST", f"{server.url}/chats/{room}/messages",
                               "-H", "Content-Type: application/json", *extra,
                               "-d", json.dumps({"author": "ann", "text": text})))


def test_curl_posts_polls_until_succeeded_and_follows_the_303(server: HeraldServer) -> None:
    status, headers, body = post_message(server, "curl", "hello from curl")
    assert status == 202
    op = json.loads(body)
    assert headers["location"] == f"/operations/{op['id']}"
    assert headers["retry-after"] == "1"
    deadline = time.monotonic() + 10
    while True:
        doc = json.loads(curl(f"{server.url}{op['operation_url']}?view=status"))
        if doc["status"] == "succeeded":
            break
        assert doc["status"] in ("pending", "running")
        assert time.monotonic() < deadline, "the operation did not succeed within 10 s"
        time.sleep(0.05)
    status, headers, _ = split_response(curl("-i", f"{server.url}{op['operation_url']}"))
    assert status == 303
    assert headers["location"].startswith("/chats/curl/messages/m_")
    message = json.loads(curl("-L", f"{server.url}{op['operation_url']}"))
    assert message["text"] == "hello from curl"
    assert message["operation_id"] == op["id"]
    assert headers["location"].endswith(message["id"])


def test_prefer_wait_answers_with_the_finished_operation(server: HeraldServer) -> None:
    status, headers, body = post_message(server, "wait", "are you there?", "Prefer: wait=5")
    assert status == 200
    assert headers["preference-applied"] == "wait=5"
    op = json.loads(body)
    assert op["status"] == "succeeded"
    assert op["result"]["text"] == "are you there?"
    assert headers["content-location"] == op["operation_url"]


def texts(blocks: list[Block]) -> list[str]:
    """The message texts of ``ChatMessageDelivered`` blocks."""
    return [b.json()["data"]["text"] for b in blocks if b.event == "ChatMessageDelivered"]


async def test_sse_gets_correlated_events_in_order_and_resumes_with_exactly_the_missed_ones(
    server: HeraldServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        room = (await client.get("/chats/e2e-sse")).json()
        async with sse_connect(client, room["subscribe_url"]) as stream:
            assert (await stream.next_block()).retry == 2000
            op = (await client.post("/chats/e2e-sse/messages", json={"author": "ann", "text": "one"})).json()
            (first,) = await stream.messages(1)
            async with sse_connect(client, op["subscribe_url"]) as op_stream:
                op_events = [b for b in await op_stream.until_end() if b.is_message]
        assert [b.event for b in op_events] == ["herald.operation.running", "ChatMessageDelivered",
                                                "herald.operation.succeeded"]
        correlated: list[dict[str, Any]] = [b.json() for b in op_events]
        assert {e["correlationid"] for e in correlated} == {op["id"]}
        assert len({e["causationid"] for e in correlated}) == 1
        assert first.json()["id"] == correlated[1]["id"]  # the room got the same event
        assert texts([first]) == ["one"]

        # away: two messages are sent meanwhile
        for text in ("two", "three"):
            response = await client.post("/chats/e2e-sse/messages", json={"author": "bob", "text": text},
                                         headers={"Prefer": "wait=5"})
            assert response.json()["status"] == "succeeded"
        assert first.id is not None
        async with sse_connect(client, room["subscribe_url"], headers={"Last-Event-ID": first.id}) as stream:
            missed = await stream.messages(2)
            assert texts(missed) == ["two", "three"]
            await client.post("/chats/e2e-sse/messages", json={"author": "ann", "text": "four"})
            assert texts(await stream.messages(1)) == ["four"]  # then live, with nothing repeated


async def test_a_websocket_client_on_two_topics(server: HeraldServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        rooms = [(await client.get(f"/chats/{name}")).json() for name in ("ws-a", "ws-b")]
        tokens = [room["subscribe_url"].split("token=")[1] for room in rooms]
        async with connect(f"{server.ws_url}/ws", open_timeout=5, proxy=None) as ws:
            for room, token in zip(rooms, tokens, strict=True):
                await ws.send(orjson.dumps({"type": "subscribe", "topic": f"chats/{room['room']}", "token": token,
                                            "id": room["room"]}).decode())
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                assert (reply["type"], reply["id"]) == ("subscribed", room["room"])
            sent = {}
            for name in ("ws-a", "ws-b", "ws-a"):
                response = await client.post(f"/chats/{name}/messages", json={"author": "ann", "text": f"to {name}"},
                                             headers={"Prefer": "wait=5"})
                sent.setdefault(name, []).append(response.json()["id"])
            frames = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    assert [(f["topic"], f["event"]["correlationid"]) for f in frames] == [
        ("chats/ws-a", sent["ws-a"][0]), ("chats/ws-b", sent["ws-b"][0]), ("chats/ws-a", sent["ws-a"][1]),
    ]
    assert all(f["type"] == "event" and f["event"]["type"] == "ChatMessageDelivered" for f in frames)
