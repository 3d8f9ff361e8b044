"""Slots resharded under load: the busy rooms' slots and a request shard's slot move to another master.

Each slot is moved as ``redis-cli --cluster reshard`` moves it (``CLUSTER SETSLOT IMPORTING`` /
``MIGRATING``, ``MIGRATE`` of its keys, ``SETSLOT NODE``), held half moved for a while at each stage,
while two gateways accept chat messages and two workers handle them. Nothing may be lost or
duplicated: every operation runs once and succeeds, every room's history holds each message once,
and the clients that follow the rooms (SSE on one gateway, WebSocket on the other) receive exactly
what the histories hold, in order, once, though their topics' sharded subscriptions had to move.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from herald.broker.slots import key_slot, shard_tags
from tests.herald.cluster.support import (
    SSEListener,
    WSListener,
    eventually,
    eventually_async,
    in_order_once,
    run_bounded,
)
from tests.herald.rediscluster.support import COMMAND_TYPE, Deployment, topics_on_every_master

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(180)]

OPERATIONS = 300
IN_FLIGHT = 16


async def test_slots_resharded_under_load_lose_and_duplicate_nothing(deploy: Callable[..., Deployment]) -> None:
    deployment = deploy(HERALD_VISIBILITY_TIMEOUT="10")
    cluster = deployment.cluster
    masters = topics_on_every_master(cluster, "chats/reshard", per_master=1)
    rooms = [t for ts in masters.values() for t in ts]
    a, b = await asyncio.gather(deployment.gateway(), deployment.gateway())
    await asyncio.gather(deployment.worker(), deployment.worker())
    sse = SSEListener([b.url], rooms).start()
    ws = WSListener([a.ws_url]).start()
    await ws.connected()
    for room in rooms:
        await ws.subscribe(room)
    await eventually(lambda: bool(sse.connects) and sum(m["type"] == "subscribed" for m in ws.messages) == len(rooms),
                     10, "the room subscriptions")

    # what moves: every room's slot, and the slot of one request shard, each to the next master round
    ports = sorted(masters)
    moves = [(key_slot(f"herald:topic:{{{room}}}"), ports[(ports.index(port) + 1) % len(ports)])
             for port, ts in masters.items() for room in ts]
    shard = f"herald:req:{{{shard_tags(COMMAND_TYPE, 4)[0]}}}"
    shard_owner = cluster.master_of(shard).port
    moves.append((key_slot(shard), ports[(ports.index(shard_owner) + 1) % len(ports)]))

    accepted: dict[str, str] = {}
    refused: collections.Counter[int] = collections.Counter()
    async with httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=2 * IN_FLIGHT)) as http:

        async def post(n: int) -> None:
            room = rooms[n % len(rooms)]
            for _ in range(50):
                response = await http.post(f"{a.url}/{room}/messages", json={"author": "m", "text": f"#{n}"})
                if response.status_code == 202:
                    accepted[response.json()["id"]] = room
                    return
                refused[response.status_code] += 1
                await asyncio.sleep(0.2)
            raise AssertionError(f"message #{n} was never accepted")

        jobs: list[Callable[[], Awaitable[None]]] = [functools.partial(post, n) for n in range(OPERATIONS)]
        load = asyncio.ensure_future(run_bounded(jobs, IN_FLIGHT))
        await asyncio.sleep(0.3)
        for slot, port in moves:
            await asyncio.to_thread(cluster.move_slot, slot, port, pause=0.3)
        await load
        assert all(cluster.master_of(f"herald:topic:{{{r}}}").port != p for p, ts in masters.items() for r in ts)

        def subscribed_on_new_owners() -> bool:  # both gateways follow every room on the master that has it now
            for room in rooms:
                channel = f"herald:topic:{{{room}}}"
                with cluster.client(cluster.master_of(channel).port) as client:
                    counts: Any = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
                if int(counts[1]) != 2:
                    return False
            return True

        await eventually(subscribed_on_new_owners, 10, "the rooms subscribed on their new masters")

        async def all_ended() -> bool:
            statuses = await asyncio.gather(*(http.get(f"{a.url}/operations/{op}?view=status") for op in accepted))
            return all(r.status_code == 200 and r.json()["status"] == "succeeded" for r in statuses)

        await eventually_async(all_ended, 30, "every operation succeeded")

    stored = {room: deployment.stored(room) for room in rooms}
    await eventually(lambda: all(len(sse.events.get(r, [])) >= len(stored[r]) and len(ws.events[r]) >= len(stored[r])
                                 for r in rooms), 20, "the clients received every stored event")
    await asyncio.sleep(0.3)  # a duplicate would arrive now
    await sse.close()
    await ws.close()
    print(f"moved slots {moves}; {len(accepted)} accepted, refused {dict(refused)}; SSE connects {sse.connects}")
    assert len(accepted) == OPERATIONS
    for room in rooms:
        history = stored[room]
        # each message delivered once in the room's history: no operation ran twice
        assert sorted(e.event["correlationid"] for e in history) == sorted(
            op for op, r in accepted.items() if r == room)
        for got in (sse.events.get(room, []), ws.events[room]):
            assert not in_order_once(got), in_order_once(got)[:3]
            assert [(e.cursor, e.event["id"]) for e in got] == [(e.cursor, e.event["id"]) for e in history]
    assert not [c for c in sse.controls if c.event == "herald.gap"], "nothing fell out of the histories"
    assert deployment.queued() == (0, 0)
    for op in accepted:
        history = deployment.stored(f"operations/{op}")
        assert [e.event["data"]["attempts"] for e in history if e.type == "herald.operation.running"] == [1]
