"""Observability: /metrics, JSON logs with the correlation id and no tokens, traceparent end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from herald.broker.memory import MemoryBroker
from herald.events import build_event
from herald.hub import Hub, Subscriber
from herald.metrics import Metrics
from tests.herald.cluster.support import Cluster
from tests.support.redis_server import RedisServer
from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SEND = "/chats/lobby/messages"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for_metric(client: httpx.AsyncClient, name: str, expected: float, **labels: str) -> str:
    """Scrape until ``name`` reaches ``expected`` (bounded: 10 s)."""
    text = ""
    for _ in range(200):
        text = (await client.get("/metrics")).text
        if value(text, name, **labels) >= expected:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {expected}:\n{text}")


# /metrics ----------------------------------------------------------------------------------


async def test_metrics_count_connections_operations_and_latency(herald: Callable[..., HeraldServer]) -> None:
    server = herald()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        first = (await client.get("/metrics"))
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("text/plain")
        room = (await client.get("/chats/metrics")).json()
        async with sse_connect(client, room["subscribe_url"]) as stream:
            await stream.next_block()  # retry: — the stream is attached
            async with websockets.connect(room["websocket_url"]) as ws:
                assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
                text = (await client.get("/metrics")).text
                assert value(text, "herald_connections", transport="sse") == 1
                assert value(text, "herald_connections", transport="ws") == 1
                assert value(text, "herald_topics") == 1
                done = await client.post("/chats/metrics/messages", json={"author": "a", "text": "hi"},
                                         headers={"Prefer": "wait=5"})
                assert done.json()["status"] == "succeeded"
                text = await wait_for_metric(client, "herald_events_delivered_total", 2)
        assert value(text, "herald_operations_total", status="pending") == 1
        assert value(text, "herald_operations_total", status="succeeded") == 1
        assert value(text, "herald_push_latency_seconds_count") == 1
        # the message went to the room's two connections (and the Prefer: wait listener)
        assert value(text, "herald_events_delivered_total") >= 2
        for name in ("herald_events_dropped_total", "herald_slow_consumer_disconnects_total",
                     "herald_broker_errors_total", "herald_broker_reconnects_total"):
            assert (name, ()) in samples(text)
        text = await wait_for_metric(client, "herald_connections", 0, transport="sse")
        assert value(text, "herald_connections", transport="ws") == 0


async def test_overflow_is_counted_as_dropped_frames_and_a_slow_disconnect() -> None:
    broker = MemoryBroker()
    hub = Hub(broker)
    metrics = Metrics(hub, broker)
    broker.set_sink(metrics.sink(hub.dispatch))
    sub = Subscriber(max_queue=2)
    await hub.follow(sub, "chats/slow", None, from_start=False)
    for n in range(5):
        await broker.publish("chats/slow", build_event("T", {"n": n}, source="test"))
    assert sub.reason == "slow-consumer"
    await hub.leave(sub)
    text = metrics.render().decode()
    assert value(text, "herald_slow_consumer_disconnects_total") == 1
    # two queued + the one that overflowed, then two more pushed while it was closing
    assert value(text, "herald_events_dropped_total") == 5
    assert value(text, "herald_events_delivered_total") == 5


async def test_broker_error_and_reconnect_counts_are_exported() -> None:
    broker = MemoryBroker()
    metrics = Metrics(Hub(broker), broker)
    broker.errors, broker.reconnects = 3, 2
    text = metrics.render().decode()
    assert value(text, "herald_broker_errors_total") == 3
    assert value(text, "herald_broker_reconnects_total") == 2


@pytest.mark.redis
async def test_broker_errors_and_reconnects_are_counted_against_a_real_redis(
    herald: Callable[..., HeraldServer],
) -> None:
    redis = RedisServer().start()  # its own: this test takes it away
    try:
        server = herald({"REDIS_URL": redis.url()})
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert (await client.post(SEND, json={"author": "a", "text": "up"})).status_code == 202
            assert value((await client.get("/metrics")).text, "herald_broker_errors_total") == 0
            redis.stop()
            assert (await client.post(SEND, json={"author": "a", "text": "down"})).status_code == 503
            assert value((await client.get("/metrics")).text, "herald_broker_errors_total") >= 1
            redis.start()
            await wait_for_metric(client, "herald_broker_reconnects_total", 1)
            assert (await client.post(SEND, json={"author": "a", "text": "back"})).status_code == 202
    finally:
        redis.cleanup()


def test_latency_clocks_are_bounded_in_count_and_age() -> None:
    broker = MemoryBroker()
    metrics = Metrics(Hub(broker), broker, track=3)
    for n in range(10):
        metrics.accepted(f"op_{n}")
    assert list(metrics._accepted_at) == ["op_7", "op_8", "op_9"]
    aged = Metrics(Hub(broker), broker, horizon=0.05)
    aged.accepted("op_old")
    time.sleep(0.1)
    aged.accepted("op_new")
    assert list(aged._accepted_at) == ["op_new"]


# Logs --------------------------------------------------------------------------------------


def json_lines(log: str) -> list[dict[str, object]]:
    """The log's JSON lines (anything else is a failure: every line must be JSON)."""
    lines = [line for line in log.splitlines() if line.strip()]
    return [orjson.loads(line) for line in lines]


async def test_logs_are_json_carry_the_correlation_id_and_never_a_token(herald: Callable[..., HeraldServer]) -> None:
    server = herald(access_log=True)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        accepted = (await client.post(SEND, json={"author": "a", "text": "hi"})).json()
        op_id = accepted["id"]
        token = accepted["subscribe_url"].split("token=")[1]
        async with sse_connect(client, accepted["subscribe_url"]) as stream:
            await stream.until_end()
        await client.get(f"/topics/chats/lobby/events?token={token}")  # 403: wrong topic, still logged
        await client.get("/healthz", headers={"Authorization": f"Bearer {token}"})
    async with websockets.connect(accepted["websocket_url"]) as ws:
        await asyncio.wait_for(ws.recv(), 5)
    await asyncio.sleep(0.3)  # let the server flush its log
    log = server.log()
    assert token not in log
    assert token.split(".")[2] not in log  # not even the signature part
    lines = json_lines(log)
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    post = next(line for line in access if line["method"] == "POST")
    assert post["correlation_id"] == op_id
    assert post["status"] == 202
    paths = [str(line["path"]) for line in access]
    assert any(p.startswith(f"/operations/{op_id}/events?token=[redacted]") for p in paths), paths
    handshakes = [str(line["msg"]) for line in lines if "WebSocket" in str(line["msg"])]
    assert handshakes and all("token=[redacted]" in msg for msg in handshakes), handshakes


# traceparent -------------------------------------------------------------------------------


async def test_traceparent_goes_from_the_post_through_the_worker_to_every_event(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        accepted = (await client.post(SEND, json={"author": "a", "text": "traced"},
                                      headers={"traceparent": TRACEPARENT})).json()
        async with sse_connect(client, accepted["subscribe_url"]) as stream:
            blocks = [b for b in await stream.until_end() if b.is_message]
    types = [b.event for b in blocks]
    assert types == ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]
    assert all(b.json()["traceparent"] == TRACEPARENT for b in blocks), [b.json() for b in blocks]


async def test_traceparent_of_a_websocket_command_reaches_its_events(herald: Callable[..., HeraldServer]) -> None:
    server = herald()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        room = (await client.get("/chats/traced")).json()
    async with websockets.connect(room["websocket_url"]) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
        command = {"type": "command", "id": 1, "method": "POST", "path": "/chats/traced/messages",
                   "body": {"author": "a", "text": "x"}, "headers": {"traceparent": TRACEPARENT}}
        await ws.send(orjson.dumps(command).decode())
        seen = []
        async with asyncio.timeout(5):
            while not any(m.get("type") == "event" for m in seen):
                seen.append(orjson.loads(await ws.recv()))
    events = [m["event"] for m in seen if m["type"] == "event"]
    assert events[0]["type"] == "ChatMessageDelivered"
    assert events[0]["traceparent"] == TRACEPARENT



@pytest.mark.redis
async def test_traceparent_crosses_redis_and_a_separate_worker_process() -> None:
    cluster = Cluster(HERALD_EMBEDDED_WORKER="0")
    try:
        gateway = await cluster.gateway()
        await cluster.worker()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            accepted = (await client.post(SEND, json={"author": "a", "text": "far"},
                                          headers={"traceparent": TRACEPARENT})).json()
            async with sse_connect(client, accepted["subscribe_url"]) as stream:
                blocks = [b for b in await stream.until_end(timeout=15) if b.is_message]
    finally:
        cluster.close()
    assert [b.event for b in blocks] == ["herald.operation.running", "ChatMessageDelivered",
                                         "herald.operation.succeeded"]
    assert all(b.json()["traceparent"] == TRACEPARENT for b in blocks)
    assert all(b.json()["source"].startswith("herald.worker/") for b in blocks[1:2])
