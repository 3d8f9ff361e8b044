"""Finding 14 of the security review (issue 13): streams outlived their tokens.

A stream opened with a 2 s subscribe token went on delivering events after the token had expired.
Each test opens such a stream on a real ``herald serve`` process and checks it ends at the expiry,
with the cursor to resume from, and that a fresh token resumes it with exactly the missed events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from herald.auth import TokenSigner
from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

SIGNER = TokenSigner("herald-test-secret-0123456789abcdef")
DETAIL = "the subscribe token expired; fetch fresh URLs and reconnect with the cursor"
LATE = 2.0
"""Seconds after its token's expiry within which a stream must have ended (the sweep runs every second)."""


@pytest.fixture(scope="module")
def server() -> Iterator[HeraldServer]:
    """One gateway serving the notice board (``notices/…`` open to anyone, ``drafts/…`` by token)."""
    with HeraldServer(target=("--domain", "tests.herald.hardening.notice_board:board")) as served:
        yield served


def short_token(topic: str) -> tuple[str, int]:
    """A token for ``topic`` that expires within 2 s, and its expiry (Unix seconds)."""
    token = SIGNER.issue([topic], ttl=2)
    return token, SIGNER.verify(token).expires_at


async def post(client: httpx.AsyncClient, topic: str, n: int) -> None:
    """Publish ``Posted {n}`` on ``topic`` and wait until it is out."""
    response = await client.post(f"/posts/{topic}", json={"n": n}, headers={"Prefer": "wait=5"})
    assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text


async def receive(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next WebSocket message, decoded."""
    doc: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    return doc


def new_board() -> str:
    """A board name no other test uses."""
    return uuid.uuid4().hex[:10]


async def test_14_an_sse_stream_ends_with_token_expired_and_resumes_with_a_fresh_token(server: HeraldServer) -> None:
    topic = f"drafts/{new_board()}"
    token, expires_at = short_token(topic)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with sse_connect(client, f"/topics/{topic}/events", params={"token": token}) as stream:
            assert stream.response.status_code == 200
            for n in (1, 2):
                await post(client, topic, n)
            got = await stream.messages(2)
            assert [b.json()["data"]["n"] for b in got] == [1, 2]
            notice = await stream.next_message(timeout=expires_at + LATE + 1 - time.time())
            arrived = time.time()
            for n in (3, 4):  # after the expiry: not for this stream
                await post(client, topic, n)
            rest = await stream.until_end(timeout=3)
        assert notice.event == "herald.disconnect", f"the stream went on after its token expired: {notice}"
        assert expires_at <= arrived <= expires_at + LATE
        assert notice.json() == {"reason": "token-expired", "detail": DETAIL, "reconnect": True, "cursor": got[-1].id}
        assert [b for b in rest if b.is_message] == []

        fresh = SIGNER.issue([topic])
        async with sse_connect(client, f"/topics/{topic}/events", params={"token": fresh},
                               headers={"Last-Event-ID": notice.json()["cursor"]}) as again:
            missed = await again.messages(2)
            await post(client, topic, 5)
            live = await again.next_message()
    assert [b.json()["data"]["n"] for b in missed] == [3, 4]
    assert live.json()["data"]["n"] == 5  # nothing doubled in between


async def test_14_a_websocket_closes_4003_when_its_token_expires_and_resumes_with_a_fresh_token(
    server: HeraldServer,
) -> None:
    topic = f"drafts/{new_board()}"
    token, expires_at = short_token(topic)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with connect(f"{server.ws_url}/ws?topic={topic}&token={token}", open_timeout=5, close_timeout=2,
                           compression=None, proxy=None) as ws:
            assert (await receive(ws))["type"] == "subscribed"
            for n in (1, 2):
                await post(client, topic, n)
            got = [await receive(ws) for _ in range(2)]
            assert [f["event"]["data"]["n"] for f in got] == [1, 2]
            with pytest.raises(ConnectionClosed):
                frame = await receive(ws, timeout=expires_at + LATE + 1 - time.time())
                pytest.fail(f"the socket went on after its token expired: {frame}")
            arrived = time.time()
        assert (ws.close_code, ws.close_reason) == (4003, DETAIL)
        assert expires_at <= arrived <= expires_at + LATE
        for n in (3, 4):
            await post(client, topic, n)

        async with connect(f"{server.ws_url}/ws", open_timeout=5, close_timeout=2, compression=None,
                           proxy=None) as ws:
            await ws.send(orjson.dumps({"type": "subscribe", "topic": topic, "token": SIGNER.issue([topic]),
                                        "cursor": got[-1]["cursor"], "id": "again"}).decode())
            assert (await receive(ws))["type"] == "subscribed"
            missed = [await receive(ws) for _ in range(2)]
            await ws.send(orjson.dumps({"type": "ping", "id": "p"}).decode())
            assert await receive(ws) == {"type": "pong", "id": "p"}  # nothing doubled in between
    assert [f["event"]["data"]["n"] for f in missed] == [3, 4]


async def test_14_streams_opened_without_a_token_outlive_every_token(server: HeraldServer) -> None:
    board = new_board()
    guarded, open_topic = f"drafts/{board}", f"notices/{board}"
    token, expires_at = short_token(guarded)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with (
            sse_connect(client, f"/topics/{guarded}/events", params={"token": token}) as expiring,
            sse_connect(client, f"/topics/{open_topic}/events") as sse,
            connect(f"{server.ws_url}/ws?topic={open_topic}", open_timeout=5, compression=None, proxy=None) as ws,
        ):
            assert (expiring.response.status_code, sse.response.status_code) == (200, 200)
            assert (await receive(ws))["type"] == "subscribed"
            # the token stream's end shows the expiry sweep has run past this token's second
            notice = await expiring.next_message(timeout=expires_at + LATE + 1 - time.time())
            assert notice.event == "herald.disconnect" and notice.json()["reason"] == "token-expired"
            await post(client, open_topic, 1)
            over_sse = await sse.next_message()
            over_ws = await receive(ws)
    assert over_sse.event == "Posted" and over_sse.json()["data"] == {"n": 1}
    assert over_ws["type"] == "event" and over_ws["event"]["data"] == {"n": 1}
