"""A slow consumer is cut off with a reason it can act on, loses nothing, and never slows the others.

Two ways to fall behind: a burst larger than the queue while the connection is healthy (the
transport then says why it closes: SSE ``herald.disconnect``, WebSocket close ``4008``; on
Herald's own uvicorn protocols an SSE or WebSocket frame that finds the connection idle is written to
the socket at once, so there a burst fills the queue only once the socket itself is full), and a
client that stops reading altogether (its socket buffers fill, its queue overflows, and after
``slow_client_grace`` its connection is cut) while a well-behaved client on the same topic
receives every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from herald.events import build_event
from tests.herald.http.harness import LiveHerald, wait_until
from tests.support.sse import Block, SSEParser, SSEStream, sse_connect

PAD = 32 * 1024  # bytes of incompressible padding per event, to fill socket buffers quickly
MAX_EVENTS = 1500  # bound on the events published before a stalled client must have been cut off


async def publish(live: LiveHerald, topic: str, n: int, start: int = 0, pad: int = 0) -> list[str]:
    """Publish ``n`` events without yielding to the event loop in between; their cursors."""
    return [
        await live.broker.publish(topic, build_event("Tick", {"n": start + i, "pad": secrets.token_hex(pad // 2)},
                                                     source="test"))
        for i in range(n)
    ]


def stalled_socket() -> socket.socket:
    """A TCP socket with a tiny receive buffer (which also turns off the kernel's autotuning)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def raw_sse(live: LiveHerald, path: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """An SSE request on a raw socket that reads nothing until the test says so."""
    sock = stalled_socket()
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", live.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_to_end(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the server closes the connection."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def sse_blocks(raw_response: bytes) -> list[Block]:
    """The SSE blocks of a raw HTTP/1.1 chunked response."""
    head, _, body = raw_response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    payload = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0 or len(rest) < size:
            break
        payload += rest[:size]
        body = rest[size + 2 :]
    return SSEParser().feed(payload)


async def publish_until_cut_off(live: LiveHerald, topic: str, keeper: SSEStream | None = None) -> int:
    """Publish padded events one by one until a subscriber of ``topic`` is cut off as slow.

    With a ``keeper`` (a well-behaved SSE client), each event is published only once it has
    read the previous one, so its queue never grows. Returns how many events were published.
    """
    hub = live.gateway.hub
    for n in range(MAX_EVENTS):
        await publish(live, topic, 1, start=n, pad=PAD)
        if keeper is not None:
            got = await keeper.next_message(timeout=5)
            assert got.json()["data"]["n"] == n
        else:
            await asyncio.sleep(0)
        if any(s.overflowed_at is not None for s in hub._subscribers):
            return n + 1
    raise AssertionError(f"no subscriber was cut off after {MAX_EVENTS} events")


# A burst larger than the queue -------------------------------------------------------------------


async def test_sse_burst_overflow_says_herald_disconnect_and_the_cursor_resumes_it(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    # uvicorn's own protocol: every frame goes through the stream's queue, which the burst overflows
    live = await make_live(queue_size=4, http="httptools")
    url = f"/topics/chats/burst/events?token={live.gateway.signer.issue(['chats/burst'])}"
    (before,) = await publish(live, "chats/burst", 1)
    async with sse_connect(live.client, url) as stream:
        await stream.next_block()
        cursors = await publish(live, "chats/burst", 10, start=1)  # no yield: the stream cannot keep up
        notice = await stream.next_message()
        assert await stream.until_end() == []
    assert notice.event == "herald.disconnect"
    assert notice.id is None
    assert notice.json() == {
        "reason": "slow-consumer",
        "detail": "fell behind; reconnect with your cursor and nothing is lost",
        "reconnect": True,
        "cursor": before,
    }
    async with sse_connect(live.client, url, headers={"Last-Event-ID": before}) as stream:
        resumed = await stream.messages(10)
    assert [b.id for b in resumed] == cursors
    assert live.gateway.hub.slow_disconnects == 1


async def test_sse_burst_to_a_reading_client_is_written_straight_through_on_heralds_protocol(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    # the same burst as above on Herald's protocol (the default here, as in the Procfile): each frame
    # finds the stream idle and goes to the socket at once, so the small queue never fills
    live = await make_live(queue_size=4)
    url = f"/topics/chats/burst/events?token={live.gateway.signer.issue(['chats/burst'])}"
    async with sse_connect(live.client, url) as stream:
        await stream.next_block()
        cursors = await publish(live, "chats/burst", 10)
        got = await stream.messages(10)
    assert [b.id for b in got] == cursors
    assert [b.json()["data"]["n"] for b in got] == list(range(10))
    assert live.gateway.hub.slow_disconnects == 0


async def test_websocket_burst_overflow_closes_4008(make_live: Callable[..., Awaitable[LiveHerald]]) -> None:
    # uvicorn's own protocol: every frame goes through the socket's queue, which the burst overflows
    live = await make_live(queue_size=4, ws="websockets-sansio")
    token = live.gateway.signer.issue(["chats/burst"])
    url = f"{live.ws_url}/ws?topic=chats/burst&token={token}"
    async with connect(url, open_timeout=5, compression=None, proxy=None) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
        await publish(live, "chats/burst", 10)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    assert ws.close_code == 4008
    assert ws.close_reason == "fell behind; reconnect with your cursor and nothing is lost"


async def test_websocket_burst_to_a_reading_client_is_written_straight_through_on_heralds_protocol(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    # the same burst on Herald's socket protocol: each frame finds the socket idle and is written at once
    live = await make_live(queue_size=4)
    token = live.gateway.signer.issue(["chats/burst"])
    async with connect(f"{live.ws_url}/ws?topic=chats/burst&token={token}", open_timeout=5, compression=None,
                       proxy=None) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
        cursors = await publish(live, "chats/burst", 10)
        got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(10)]
    assert [m["cursor"] for m in got] == cursors
    assert [m["event"]["data"]["n"] for m in got] == list(range(10))
    assert live.gateway.hub.slow_disconnects == 0


# A client that stops reading ---------------------------------------------------------------------


async def test_a_stalled_sse_client_is_cut_off_while_another_receives_everything(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    live = await make_live(queue_size=4, heartbeat=0.05, slow_client_grace=0.2, history_size=MAX_EVENTS)
    path = f"/topics/chats/stall/events?token={live.gateway.signer.issue(['chats/stall'])}"
    async with sse_connect(live.client, path) as keeper, raw_sse(live, path) as (reader, _):
        await keeper.next_block()
        await wait_until(lambda: live.gateway.hub.connections == 2)
        published = await publish_until_cut_off(live, "chats/stall", keeper)
        # the keeper goes on receiving while the stalled client is being cut off
        for n in range(published, published + 3):
            await publish(live, "chats/stall", 1, start=n, pad=PAD)
            assert (await keeper.next_message()).json()["data"]["n"] == n
        await wait_until(lambda: live.gateway.hub.connections == 1)
        blocks = sse_blocks(await read_to_end(reader))
    assert live.gateway.hub.slow_disconnects == 1
    got = [b for b in blocks if b.is_message]
    assert got, "the stalled client had received some events before it stopped reading"
    assert [b.json()["data"]["n"] for b in got] == list(range(len(got)))  # in order, no gaps, no repeats
    assert len(got) < published
    # reconnecting with the last cursor it has loses nothing
    last = got[-1].id
    assert last is not None
    async with sse_connect(live.client, path, headers={"Last-Event-ID": last}) as again:
        rest = await again.messages(published + 3 - len(got), timeout=10)
    assert [b.json()["data"]["n"] for b in rest] == list(range(len(got), published + 3))


async def test_a_stalled_websocket_client_is_closed_4008_while_another_receives_everything(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    live = await make_live(queue_size=4, heartbeat=0.05, slow_client_grace=0.2)
    path = f"/topics/chats/wstall/events?token={live.gateway.signer.issue(['chats/wstall'])}"
    url = f"{live.ws_url}/ws?topic=chats/wstall&token={live.gateway.signer.issue(['chats/wstall'])}"
    sock = stalled_socket()
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", live.port))
    async with sse_connect(live.client, path) as keeper, connect(
        url, sock=sock, open_timeout=5, close_timeout=5, compression=None, proxy=None, max_queue=1,
        max_size=None, ping_interval=None,
    ) as stalled:
        await keeper.next_block()
        assert orjson.loads(await asyncio.wait_for(stalled.recv(), 5))["type"] == "subscribed"
        published = await publish_until_cut_off(live, "chats/wstall", keeper)
        await wait_until(lambda: live.gateway.hub.connections == 1)
        numbers = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    numbers.append(orjson.loads(await stalled.recv())["event"]["data"]["n"])
    assert stalled.close_code == 4008
    assert numbers == list(range(len(numbers)))
    assert len(numbers) < published
    assert live.gateway.hub.slow_disconnects == 1
