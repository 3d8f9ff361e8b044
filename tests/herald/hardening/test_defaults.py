"""Finding 5 of the security review (issue 13): the defaults let one anonymous client fill memory.

3,000 posts from one client in 4 s were all accepted, and the memory broker kept every event
for a day. Now, with nothing configured, an anonymous client gets ``429`` beyond 20 commands per
second, and the memory broker keeps a bounded number of events, the oldest evicted first, which
a client resuming from before them is told as a gap. Each attack runs against a real process.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import httpx
import pytest

from herald.settings import ANONYMOUS_RATE_LIMIT
from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

SEND = "/chats/flood/messages"


def limited(metrics: str, reason: str) -> float:
    """``herald_limited_total{reason=...}`` from a ``/metrics`` page."""
    match = re.search(rf'^herald_limited_total{{reason="{reason}"}} (\S+)$', metrics, re.M)
    assert match is not None, metrics
    return float(match.group(1))


async def test_one_anonymous_client_posting_3000_commands_is_held_to_the_default_rate(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald({"HERALD_RATE_LIMIT": ""})  # empty: the shipped default, as with nothing configured
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10,
                                 limits=httpx.Limits(max_connections=16)) as client:

        async def post(numbers: range) -> None:
            for n in numbers:
                statuses.append((await client.post(SEND, json={"author": "x", "text": str(n)})).status_code)

        started = time.monotonic()
        await asyncio.gather(*(post(range(i, 3000, 16)) for i in range(16)))
        seconds = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
    accepted, refused = statuses.count(202), statuses.count(429)
    assert accepted + refused == 3000, sorted(set(statuses))
    # at most the default per started one-second window (the burst spans int(seconds) + 2 of them at most)
    assert accepted <= ANONYMOUS_RATE_LIMIT * (int(seconds) + 2), (accepted, seconds)
    assert refused >= 3000 - ANONYMOUS_RATE_LIMIT * (int(seconds) + 2)
    assert limited(metrics, "rate-limited") == refused


async def test_an_explicit_zero_still_turns_the_rate_limit_off(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_RATE_LIMIT": "0"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        statuses = await asyncio.gather(*(client.post(SEND, json={"author": "x", "text": str(n)})
                                          for n in range(3 * ANONYMOUS_RATE_LIMIT)))
    assert {s.status_code for s in statuses} == {202}


async def test_the_memory_broker_keeps_a_bounded_history_and_a_resume_from_an_evicted_cursor_is_a_gap(
    herald: Callable[..., HeraldServer],
) -> None:
    bound = 30
    server = herald({"HERALD_MEMORY_MAX_EVENTS": str(bound)})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        room = (await client.get("/chats/flood")).json()
        async with sse_connect(client, room["subscribe_url"], headers={"Last-Event-ID": "0-0"}) as live:
            for n in range(60):  # each also ends an operation: its status events count too
                assert (await client.post(SEND, json={"author": "x", "text": str(n)})).status_code == 202
            cursors = [block.id for block in await live.messages(60, timeout=20)]
        metrics = (await client.get("/metrics")).text
        assert limited(metrics, "history-evicted") >= 2 * 60 - bound

        # What the room's history still holds, read from its start: at most the bound, the newest ones
        async with sse_connect(client, room["subscribe_url"], headers={"Last-Event-ID": cursors[0]}) as resumed:
            gap = await resumed.next_message()
            assert gap.event == "herald.gap"
            assert gap.json()["cursor"] == cursors[0]
            oldest = gap.json()["oldest"]
            assert oldest in cursors[1:]
            kept = cursors[cursors.index(oldest):]
            assert len(kept) <= bound
            assert [block.id for block in await resumed.messages(len(kept))] == kept
