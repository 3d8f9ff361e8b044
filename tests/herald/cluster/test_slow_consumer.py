"""Slow consumers on a gateway fed by Redis: cut off with their reason, nobody else slowed, memory bounded.

Two raw-socket SSE clients with a tiny receive buffer stop reading while a flood of 8 KB events
goes through Redis to the gateway. One resumes reading soon after (within the grace): it finds
the ``herald.disconnect`` notice with ``slow-consumer`` and its cursor at the end of what it was
sent. The other never reads again: it is cut off after the grace. Meanwhile an SSE and a
WebSocket client read everything, in order, and the gateway's resident memory stays within a
bound far below what the flood would cost if a stalled client's queue were not bounded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from herald.broker.redis import RedisBroker
from herald.events import build_event
from tests.herald.cluster.support import (
    Cluster,
    SSEListener,
    WSListener,
    eventually,
    eventually_async,
    parse_sse,
    rss_bytes,
    token_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(120)]

TOPIC = "chats/flood"
PAD = "x" * 8000  # ~8 KB per event
FLOOD = 4000  # ~32 MB of events: kept whole by a stalled client's queue, ~100 MB with their framings
WINDOW = 300  # the publisher stays at most this many events ahead of the fast clients (Redis' pub/sub buffer)
RSS_BOUND = 50 * 1024 * 1024


class RawSSE:
    """An SSE request on a blocking socket with a 4 KB receive buffer, read only when the test says so."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.raw = b""

    def drain(self, timeout: float) -> bool:
        """Read until the server closes the connection (``True``) or ``timeout`` s pass (``False``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.raw += chunk
        return False

    def body(self) -> tuple[bytes, bool]:
        """The response body, de-chunked as far as it is complete, and whether its last chunk came."""
        head, _, rest = self.raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        out = b""
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep or not re.fullmatch(rb"[0-9a-fA-F]+", size_line):
                return out, False
            size = int(size_line, 16)
            if size == 0:
                return out, True
            if len(rest) < size + 2:
                return out + rest[:size], False
            out, rest = out + rest[:size], rest[size + 2:]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def metric(text: str, name: str) -> float:
    """The value of one sample of the gateway's /metrics text."""
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


@pytest.fixture
async def publisher() -> AsyncIterator[list[RedisBroker]]:
    """Holds the test's own RedisBroker (closed after the test)."""
    made: list[RedisBroker] = []
    yield made
    for broker in made:
        await broker.close()


async def test_slow_consumers_are_cut_off_with_their_reason_and_neither_slow_the_others_nor_grow_memory(
    make_cluster: Callable[..., Cluster], publisher: list[RedisBroker]
) -> None:
    cluster = make_cluster(HERALD_QUEUE_SIZE="200", HERALD_HISTORY_SIZE="100", HERALD_SLOW_CLIENT_GRACE="6")
    gateway = await cluster.gateway()
    broker = RedisBroker(cluster.redis.url(), history_size=100)
    publisher.append(broker)
    assert gateway.process is not None
    pid = gateway.process.pid

    fast_sse = SSEListener([gateway.url], [TOPIC]).start()
    fast_ws = WSListener([gateway.ws_url]).start()
    await fast_ws.connected()
    await fast_ws.subscribe(TOPIC)
    path = f"/topics/{TOPIC}/events?token={token_for(TOPIC)}"
    lagging, stalled = RawSSE(gateway.port, path), RawSSE(gateway.port, path)
    async with httpx.AsyncClient(base_url=gateway.url) as http:

        async def scrape() -> str:
            return (await http.get("/metrics")).text

        async def holds(name: str, value: float) -> bool:
            return metric(await scrape(), name) >= value

        await eventually_async(lambda: holds('herald_connections{transport="sse"}', 3), 10, "three SSE streams")
        await eventually(lambda: any(m["type"] == "subscribed" for m in fast_ws.messages), 10, "WS subscribed")

        cursors: list[str] = []

        async def flood(numbers: range) -> None:
            for n in numbers:
                event = build_event("Tick", {"n": n, "topic": TOPIC, "pad": PAD}, source="test")
                cursors.append(await broker.publish(TOPIC, event))
                if n % 50 == 0:  # stay within WINDOW of the fast clients, as a bounded wait
                    await eventually(lambda: len(cursors) - min(len(fast_sse.all), len(fast_ws.events[TOPIC]))
                                     < WINDOW, 30, "the fast clients keep up")

        await flood(range(50))
        await eventually(lambda: len(fast_sse.all) == len(fast_ws.events[TOPIC]) == 50, 10, "the warm-up")
        rss_before = rss_bytes(pid)

        await flood(range(50, 1550))  # enough to overflow both stalled readers (4 MB socket buffer + 200 queued)
        lagging_closed = asyncio.ensure_future(asyncio.to_thread(lagging.drain, 10.0))  # it reads again
        await flood(range(1550, 50 + FLOOD))
        await eventually(lambda: len(fast_sse.all) == len(fast_ws.events[TOPIC]) == 50 + FLOOD, 30,
                         "the fast clients got the whole flood")
        await eventually(lambda: lagging_closed.done(), 15, "the lagging client's stream ended")
        # the grace (6 s) and a heartbeat tick, with room
        await eventually_async(lambda: holds("herald_slow_consumer_disconnects_total", 2), 20, "both cut off")
        rss_after = rss_bytes(pid)
        metrics = await scrape()
    stalled_closed = await asyncio.to_thread(stalled.drain, 10.0)

    lagging_body, lagging_complete = lagging.body()
    lagging_messages = [m for m in parse_sse(lagging_body)[0] if m is not None]
    stalled_body, _ = stalled.body()
    stalled_events = [m for m in parse_sse(stalled_body)[0] if m is not None]
    notice = lagging_messages[-1]
    print(f"published {len(cursors)} events of ~8 KB; fast SSE got {len(fast_sse.all)}, fast WS "
          f"{len(fast_ws.events[TOPIC])}; lagging got {len(lagging_messages) - 1} then {notice.event} "
          f"{notice.data}; stalled got {len(stalled_events)} before it was cut off; gateway RSS "
          f"{rss_before / 2**20:.1f} MB -> {rss_after / 2**20:.1f} MB")

    assert lagging_closed.result() and lagging_complete, "the lagging client's stream was ended cleanly"
    assert notice.event == "herald.disconnect"
    assert notice.data["reason"] == "slow-consumer" and notice.data["reconnect"] is True
    assert notice.data["cursor"] == lagging_messages[-2].id, "the notice names the last event it was sent"
    assert [m.id for m in lagging_messages[:-1]] == cursors[:len(lagging_messages) - 1]
    assert stalled_closed, "the stalled client was cut off"
    assert 0 < len(stalled_events) < len(cursors)
    assert metric(metrics, "herald_slow_consumer_disconnects_total") == 2
    assert metric(metrics, 'herald_connections{transport="sse"}') == 1
    for got in (fast_sse.all, fast_ws.events[TOPIC]):
        assert [e.cursor for e in got] == cursors, "the other clients got everything, in order, once"
    assert not fast_sse.controls and [c[1] for c in fast_sse.connects] == [200] and fast_ws.connects == 1
    assert rss_after - rss_before < RSS_BOUND, f"the gateway grew by {(rss_after - rss_before) / 2**20:.1f} MB"
    lagging.close()
    stalled.close()
    await fast_sse.close()
    await fast_ws.close()
