"""1,000 operations through two gateways and two workers on a Redis Cluster (three masters, three replicas).

The single-Redis test (tests/herald/cluster/test_thousand_operations.py) on the cluster broker:
clients POST to gateway A; each operation is followed over SSE on gateway B and over a WebSocket
on A; one multiplexed SSE stream on B follows every room, and the rooms are chosen so that each
master serves some of them (so each gateway holds a sharded pub/sub connection to every master).
Every operation must be handled by exactly one worker, through every shard of the request
stream, and every client must have received every event of what it followed, in order, once —
exactly what the cluster stored.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from herald.broker.slots import key_slot, shard_tags
from tests.herald.cluster.support import (
    Received,
    SSEListener,
    WSListener,
    eventually,
    in_order_once,
    read_stream,
    run_bounded,
)
from tests.herald.rediscluster.support import COMMAND_TYPE, Deployment, topics_on_every_master

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(240)]

OPERATIONS = 1000
CLIENTS = 10  # each with its own WebSocket on A
PER_CLIENT_IN_FLIGHT = 5  # so at most 50 operations are in flight at once
EXPECTED = ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]


def _token(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


async def test_a_thousand_operations_on_a_redis_cluster_each_handled_once_and_received_in_order(
    deploy: Callable[..., Deployment],
) -> None:
    deployment = deploy(HERALD_VISIBILITY_TIMEOUT="30")  # no faults: nothing is redelivered
    masters = topics_on_every_master(deployment.cluster, "chats/load", per_master=3)
    rooms = [t for ts in masters.values() for t in ts]
    a, b = await asyncio.gather(deployment.gateway(), deployment.gateway())
    workers = await asyncio.gather(deployment.worker(), deployment.worker())
    room_listener = SSEListener([b.url], rooms).start()
    sockets = [WSListener([a.ws_url]).start() for _ in range(CLIENTS)]
    for ws in sockets:
        await ws.connected()
    await eventually(lambda: bool(room_listener.connects), 10, "the room stream opened")

    sse_got: dict[str, list[Received]] = {}
    room_of: dict[str, str] = {}
    limits = httpx.Limits(max_connections=2 * CLIENTS * PER_CLIENT_IN_FLIGHT)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as http:

        async def operation(n: int) -> None:
            client = n % CLIENTS
            room = rooms[n % len(rooms)]
            response = await http.post(f"{a.url}/{room}/messages", json={"author": f"c{client}", "text": f"#{n}"})
            assert response.status_code == 202, response.text
            body: dict[str, Any] = response.json()
            topic = f"operations/{body['id']}"
            room_of[topic] = room
            ws = sockets[client]
            await ws.subscribe(topic, _token(body["websocket_url"]))
            sse_got[topic] = await read_stream(http, b.url + body["subscribe_url"], topic)
            await eventually(lambda: len(ws.events[topic]) >= len(EXPECTED), 30, f"{topic} over the WebSocket")
            await ws.unsubscribe(topic)

        jobs: list[Callable[[], Awaitable[None]]] = [functools.partial(operation, n) for n in range(OPERATIONS)]
        await run_bounded(jobs, CLIENTS * PER_CLIENT_IN_FLIGHT)

    await eventually(lambda: sum(len(v) for v in room_listener.events.values()) >= OPERATIONS, 30,
                     "every ChatMessageDelivered on the room stream")
    await asyncio.sleep(0.3)  # anything more (a duplicate) would arrive now
    await room_listener.close()
    for ws in sockets:
        await ws.close()

    handled_by: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    operation_masters: set[int] = set()
    nodes = [n for n in deployment.cluster.nodes() if n.master and n.slots]
    for topic in room_of:
        history = deployment.stored(topic)
        operation_masters.add(next(n.port for n in nodes if n.serves(key_slot(f"herald:op:{{{topic}}}"))))
        ws_got = next(ws.events[topic] for ws in sockets if topic in ws.events)
        expected = [(e.cursor, e.type, e.event["id"]) for e in history]
        if [e.type for e in history] != EXPECTED:
            problems.append(f"{topic} stored {[e.type for e in history]}")
        if [(e.cursor, e.type, e.event["id"]) for e in sse_got[topic]] != expected:
            problems.append(f"{topic}: SSE on B got {[e.cursor for e in sse_got[topic]]}, stored {expected}")
        if [(e.cursor, e.type, e.event["id"]) for e in ws_got] != expected:
            problems.append(f"{topic}: WebSocket on A got {[e.cursor for e in ws_got]}, stored {expected}")
        running = [e for e in history if e.type == "herald.operation.running"]
        if [e.event["data"]["attempts"] for e in running] != [1]:
            problems.append(f"{topic} was started {[e.event['data']['attempts'] for e in running]} times")
        handled_by.update(e.event["source"] for e in history if e.type == "ChatMessageDelivered")
    assert not problems, f"{len(problems)} problems, first ones: {problems[:5]}"
    assert operation_masters == set(masters), "the operations were spread over every master"

    # exactly one worker per operation: one delivery each, by one of the two worker processes
    assert sum(handled_by.values()) == OPERATIONS
    assert set(handled_by) <= {w.source for w in workers}, handled_by
    print(f"operations handled per worker: {dict(handled_by)}")
    assert all(handled_by[w.source] > 0 for w in workers), f"one worker got nothing: {handled_by}"
    # the requests went through every shard, and nothing is left queued or unacknowledged
    with deployment.client() as client:
        groups = {tag: client.xinfo_groups(f"herald:req:{{{tag}}}") for tag in shard_tags(COMMAND_TYPE, 4)}
    assert all(g and int(g[0]["entries-read"]) > OPERATIONS / 8 for g in groups.values()), groups
    assert deployment.queued() == (0, 0)

    # the multiplexed room stream on B: every delivery once, in each room's stored order
    for room in rooms:
        got = room_listener.events.get(room, [])
        assert not in_order_once(got), in_order_once(got)[:3]
        assert [(e.cursor, e.event["id"]) for e in got] == [(e.cursor, e.event["id"]) for e in deployment.stored(room)]
        assert sorted(e.event["correlationid"] for e in got) == sorted(
            t.removeprefix("operations/") for t, r in room_of.items() if r == room)
    assert [c[1] for c in room_listener.connects] == [200], "the room stream never had to reconnect"
