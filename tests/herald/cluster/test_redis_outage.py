"""A gateway process cut off from Redis, and Redis crashing under a running cluster.

Cutting one gateway off while Redis stays up (its ACL user disabled and its connections
killed) makes the outage exact: the test publishes what it likes meanwhile, then lets the
gateway back in. That shows the refill from the topic histories and the gap notice when
more was published than a history keeps. The crash test then does it the hard way: Redis
is SIGKILLed (append-only file, ``appendfsync always``) with two gateways, two workers,
SSE and WebSocket clients and a stream of commands in flight, and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from herald.broker.redis import RedisBroker
from herald.events import build_event
from tests.herald.cluster.support import (
    Cluster,
    SSEListener,
    WSListener,
    eventually,
    in_order_once,
    stored,
)

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(120)]

USER, PASSWORD = "gateway", "gateway-password-0123"


@pytest.fixture
async def publishers() -> AsyncIterator[list[RedisBroker]]:
    """RedisBrokers of the test process itself (closed after the test), to publish as a worker would."""
    made: list[RedisBroker] = []
    yield made
    for broker in made:
        await broker.close()


def gateway_user(cluster: Cluster, on: bool) -> None:
    """Let the gateway's Redis user in, or shut it out and drop every connection it holds."""
    with cluster.client() as client:
        client.execute_command("ACL", "SETUSER", USER, "on" if on else "off", f">{PASSWORD}", "~*", "&*", "+@all")
        if not on:
            client.execute_command("CLIENT", "KILL", "USER", USER)


def gateway_connections(cluster: Cluster) -> int:
    """How many connections the gateway's user holds."""
    with cluster.client() as client:
        return sum(1 for c in client.client_list() if c.get("user") == USER)


async def test_what_was_published_while_a_gateway_was_cut_off_reaches_its_clients_and_a_longer_gap_is_announced(
    make_cluster: Callable[..., Cluster], publishers: list[RedisBroker]
) -> None:
    history = 5
    cluster = make_cluster(HERALD_HISTORY_SIZE=str(history))
    gateway_user(cluster, on=True)
    gateway = await cluster.gateway(REDIS_URL=f"redis://{USER}:{PASSWORD}@127.0.0.1:{cluster.redis.port}/0")
    publisher = RedisBroker(cluster.redis.url(), history_size=history)
    publishers.append(publisher)

    async def publish(topic: str, numbers: range) -> list[str]:
        return [await publisher.publish(topic, build_event("Tick", {"n": n, "topic": topic}, source="test"))
                for n in numbers]

    busy, quiet = "chats/busy", "chats/quiet"  # quiet has no event at all when the clients subscribe
    sse = {t: SSEListener([gateway.url], [t]).start() for t in (busy, quiet)}
    ws = WSListener([gateway.ws_url]).start()
    await ws.connected()
    for topic in (busy, quiet):
        await ws.subscribe(topic)
    await eventually(lambda: all(s.connects for s in sse.values())
                     and sum(m["type"] == "subscribed" for m in ws.messages) == 2, 10, "clients subscribed")
    before = await publish(busy, range(2))
    await eventually(lambda: len(sse[busy].all) == 2 and len(ws.events[busy]) == 2, 10, "the first two events")

    gateway_user(cluster, on=False)
    await eventually(lambda: gateway_connections(cluster) == 0, 10, "the gateway cut off")
    during = await publish(busy, range(2, 2 + 2 * history))  # twice what the history keeps
    quiet_during = await publish(quiet, range(3))
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/readyz")).status_code == 503
        gateway_user(cluster, on=True)
        await eventually(lambda: len(sse[busy].all) == 2 + history and len(ws.events[busy]) == 2 + history
                         and len(sse[quiet].all) == 3 and len(ws.events[quiet]) == 3, 15, "the refill")
        assert (await http.get("/readyz")).status_code == 200
    after = await publish(busy, range(2 + 2 * history, 3 + 2 * history))
    await eventually(lambda: len(sse[busy].all) == 3 + history and len(ws.events[busy]) == 3 + history, 10,
                     "a live event after the refill")

    kept = during[-history:]
    lost = during[:-history]
    print(f"published while cut off: {len(during)} on {busy} (history {history}), 3 on {quiet}; "
          f"lost beyond the history: {lost}")
    for got in (sse[busy].all, ws.events[busy]):
        assert [e.cursor for e in got] == before + kept + after
    for got in (sse[quiet].all, ws.events[quiet]):
        assert [e.cursor for e in got] == quiet_during  # an empty topic's refill starts at its beginning
    # each client was told of the gap, once, before the first event after it, and can tell what it lost
    gap = {"topic": busy, "cursor": before[-1], "oldest": kept[0],
           "detail": "events after your cursor are no longer kept; some were missed"}
    assert [c.data for c in sse[busy].controls] == [gap]
    assert sse[busy].timeline[2:4] == ["herald.gap", f"Tick {kept[0]}"]
    assert [m for m in ws.messages if m["type"] == "gap"] == [{"type": "gap", **gap}]
    assert ws.timeline[ws.timeline.index("gap") + 1] == "Tick"
    assert ws.events[busy][2].cursor == kept[0]
    assert not sse[quiet].controls, "no gap on a topic whose history held everything"
    for listener in sse.values():
        assert [c[1] for c in listener.connects] == [200], "the SSE clients stayed connected"
        await listener.close()
    assert ws.connects == 1
    await ws.close()


async def test_a_redis_crash_loses_no_accepted_command_and_no_stored_event(
    make_cluster: Callable[..., Cluster],
) -> None:
    # appendfsync always: what Redis acknowledged is on disk; one socket follows every operation it accepts
    cluster = make_cluster(appendonly=True, HERALD_MAX_TOPICS="1000")
    a, b = await asyncio.gather(cluster.gateway(), cluster.gateway())
    # jobs of 0.4 s (tests.herald.cluster.handlers), so several are in a worker's hands when Redis dies
    await asyncio.gather(*(cluster.worker("tests.herald.cluster.handlers:FaultSettings") for _ in range(2)))
    room = "chats/storm"
    room_sse = SSEListener([b.url, a.url], [room]).start()  # on B; would fail over to A
    ws = WSListener([a.ws_url]).start()  # on A: the room and every accepted operation
    await ws.connected()
    await ws.subscribe(room)
    await eventually(lambda: bool(room_sse.connects) and any(m.get("topic") == room for m in ws.messages), 10,
                     "clients subscribed")

    posts: list[dict[str, Any]] = []  # one per POST: when, status, Retry-After, operation id
    outage: dict[str, float] = {}
    stop = asyncio.Event()

    async def post_forever(http: httpx.AsyncClient) -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            n += 1
            sent = time.monotonic()
            try:
                response = await http.post(f"/{room}/messages", json={"author": "poster", "text": "sleep 0.4"})
                status = response.status_code
            except httpx.HTTPError as exc:
                status, response = 0, None
                print(f"POST #{n} failed without an answer: {exc!r}")
            record = {"n": n, "sent": sent, "status": status}
            if response is not None:
                record["retry_after"] = response.headers.get("retry-after")
                if status == 202:
                    body = response.json()
                    record["id"] = body["id"]
                    await ws.subscribe(f"operations/{body['id']}",
                                       parse_qs(urlsplit(body["websocket_url"]).query)["token"][0])
            posts.append(record)
            await asyncio.sleep(0.03)

    async with httpx.AsyncClient(base_url=a.url, timeout=10.0) as http, \
            httpx.AsyncClient(timeout=5.0) as probe:
        poster = asyncio.ensure_future(post_forever(http))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.redis.kill)
        outage["down"] = time.monotonic()
        await asyncio.sleep(0.3)
        ready = [(await probe.get(g.url + "/readyz")).status_code for g in (a, b)]
        await ws.ping("during-the-outage")
        await asyncio.sleep(1.7)
        outage["up"] = time.monotonic()
        await asyncio.to_thread(cluster.redis.start)
        await asyncio.sleep(1.5)
        stop.set()
        await poster

        accepted = [p["id"] for p in posts if p["status"] == 202]

        async def terminal(op_id: str) -> str:
            for _ in range(300):  # bounded: 300 polls of at most ~0.1 s
                doc = (await probe.get(f"{b.url}/operations/{op_id}", params={"view": "status"})).json()
                if doc["status"] in ("succeeded", "failed", "canceled"):
                    return str(doc["status"])
                await asyncio.sleep(0.1)
            return "never ended"

        endings = await asyncio.gather(*(terminal(op_id) for op_id in accepted))
        ready_after = [(await probe.get(g.url + "/readyz")).status_code for g in (a, b)]

    redis = cluster.client()
    room_history = stored(redis, room)
    op_topics = [f"operations/{op_id}" for op_id in accepted]
    await eventually(lambda: len(room_sse.all) >= len(room_history) and len(ws.events[room]) >= len(room_history)
                     and all(len(ws.events[t]) >= len(stored(redis, t)) for t in op_topics), 15,
                     "clients caught up with what Redis stored")
    await asyncio.sleep(0.3)  # a duplicate would arrive now

    down = [p for p in posts if outage["down"] <= p["sent"] and p["sent"] + 0.01 < outage["up"]]
    statuses = sorted({p["status"] for p in posts})
    refused = [p for p in posts if p["status"] == 503]
    # a 503 whose command Redis stored anyway (its reply was lost in the crash) shows up in the room
    delivered_ops = {e.event["correlationid"] for e in room_history if e.type == "ChatMessageDelivered"}
    refused_but_stored = sorted(delivered_ops - set(accepted))
    missing = {
        "room/SSE on B": [e.cursor for e in room_history if e.cursor not in {r.cursor for r in room_sse.all}],
        "room/WebSocket on A": [e.cursor for e in room_history if e.cursor not in {r.cursor for r in ws.events[room]}],
        "operations/WebSocket on A": [f"{t} {e.cursor}" for t in op_topics for e in stored(redis, t)
                                      if e.cursor not in {r.cursor for r in ws.events[t]}],
    }
    print(f"POSTs: {len(posts)} ({len(accepted)} accepted with 202, {len(refused)} refused with 503, "
          f"{len(down)} sent while Redis was down); /readyz during the outage {ready}, after {ready_after}")
    print(f"accepted operations ending: {sorted(set(endings))}; 503'd but stored anyway: {refused_but_stored}")
    print(f"room events stored {len(room_history)}, received by SSE on B {len(room_sse.all)}, "
          f"by WebSocket on A {len(ws.events[room])}; missing: {missing}")
    print(f"SSE heartbeats during the outage: "
          f"{sum(outage['down'] <= t <= outage['up'] for t in room_sse.heartbeats)}; "
          f"SSE connects {room_sse.connects}; WebSocket connects {ws.connects}")

    assert statuses == [202, 503], statuses
    assert down and all(p["status"] == 503 for p in down), "every POST while Redis was down got 503"
    assert all(p["retry_after"] for p in refused), "a 503 says when to retry"
    assert accepted and any(p["sent"] > outage["up"] for p in posts if p["status"] == 202), "202s again after"
    assert set(endings) == {"succeeded"}, "every 202'd operation ended after Redis returned"
    assert ready == [503, 503] and ready_after == [200, 200]
    assert any(m.get("id") == "during-the-outage" for m in ws.messages if m["type"] == "pong")
    assert any(outage["down"] <= t <= outage["up"] for t in room_sse.heartbeats), "heartbeats went on"
    assert not any(missing.values()), missing
    redelivered = []
    for op_id in accepted:
        history = stored(redis, f"operations/{op_id}")
        assert [e.type for e in history if e.type.startswith("herald.operation.s")] == ["herald.operation.succeeded"]
        if sum(e.type == "herald.operation.running" for e in history) > 1:
            redelivered.append(op_id)
    print(f"operations a worker held when Redis died, redelivered after it returned and ended once: {redelivered}")
    assert redelivered, "some operations were in a worker's hands at the crash"
    for got, name in ((room_sse.all, "SSE"), (ws.events[room], "WebSocket")):
        assert [e.cursor for e in got] == [e.cursor for e in room_history], f"{name} got the room as stored"
        assert not in_order_once(got)
    for topic in op_topics:
        assert [e.cursor for e in ws.events[topic]] == [e.cursor for e in stored(redis, topic)], topic
    assert [c[1] for c in room_sse.connects] == [200] and ws.connects == 1, "the clients stayed connected"
    await room_sse.close()
    await ws.close()
