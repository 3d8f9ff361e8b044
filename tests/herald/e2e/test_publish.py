"""The publish API on real gateway processes: refusals and limits with curl, and two gateways on Redis.

On Redis: events published to one gateway are followed over SSE on the other and resumed with
``Last-Event-ID`` across them; a batch retried on the other gateway with the same
``Idempotency-Key`` lands once; one publisher's rate is counted across both.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.support.redis_server import RedisServer
from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

PUBLISH_KEY = "publisher-key-for-e2e-tests-0123456789ab"
LIMITS = {"HERALD_PUBLISH_JWT_SECRET": PUBLISH_KEY, "HERALD_PUBLISH_MAX_BATCH": "5",
          "HERALD_PUBLISH_MAX_BODY": "8192", "HERALD_PUBLISH_MAX_EVENT": "1024", "HERALD_PUBLISH_RATE": "20"}


def token(*patterns: str, sub: str = "backend", key: str = PUBLISH_KEY) -> str:
    """A publisher token for ``patterns``."""
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 300, "herald": {"publish": list(patterns)}}, key, "HS256")


def curl_post(url: str, body: bytes, *headers: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST ``body`` with the real curl (JSON unless a header says otherwise); status, headers and JSON body."""
    if not any(h.lower().startswith("content-type:") for h in headers):
        headers = ("Content-Type: application/json", *headers)
    extra = [arg for header in headers for arg in ("-H", header)]
    done = subprocess.run(["curl", "--silent", "--show-error", "--max-time", "10", "-i", "-X", "POST", url,
                           *extra, "--data-binary", "@-"],
                          input=body, capture_output=True, timeout=15)
    assert done.returncode == 0, done.stderr
    head, _, text = done.stdout.decode().replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.split("\n")
    found = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), found, json.loads(text)


@pytest.fixture(scope="module")
def limited() -> Iterator[HeraldServer]:
    """The chat application with a publisher key and small publish limits."""
    with HeraldServer(LIMITS) as server:
        yield server


def events(count: int, data: Any = None) -> bytes:
    """A JSON batch of ``count`` small events."""
    return json.dumps([{"type": "Tick", "data": data if data is not None else i} for i in range(count)]).encode()


@pytest.mark.parametrize(("case", "status", "kind"), [
    ("no token", 401, "unauthorized"),
    ("wrong key", 401, "unauthorized"),
    ("orders token to a room", 403, "publish-forbidden"),
    ("operation topic", 403, "reserved-topic"),
    ("batch too big", 422, "batch-too-large"),
    ("body too big", 413, "body-too-large"),
    ("event too big", 422, "event-too-large"),
    ("not JSON", 415, "unsupported-media-type"),
    ("bad JSON", 400, "invalid-json"),
])
def test_curl_is_refused_with_a_problem(limited: HeraldServer, case: str, status: int, kind: str) -> None:
    room = f"{limited.url}/topics/chats/refused/events"
    auth = f"Authorization: Bearer {token('chats/*', sub=case)}"
    request: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
        "no token": (room, events(1), ()),
        "wrong key": (room, events(1), (f"Authorization: Bearer {token('chats/*', key='x' * 40)}",)),
        "orders token to a room": (room, events(1), (f"Authorization: Bearer {token('orders/*')}",)),
        "operation topic": (f"{limited.url}/topics/operations/op_x/events", events(1),
                            (f"Authorization: Bearer {token('**')}",)),
        "batch too big": (room, events(6), (auth,)),
        "body too big": (room, events(5, "x" * 2000), (auth,)),
        "event too big": (room, events(2, "y" * 1100), (auth,)),
        "not JSON": (room, b"type=Tick", (auth, "Content-Type: application/x-www-form-urlencoded")),
        "bad JSON": (room, b"[{", (auth,)),
    }
    url, body, headers = request[case]
    got, found, doc = curl_post(url, body, *headers)
    assert (got, doc["status"], doc["type"]) == (status, status, f"https://herald.dev/problems/{kind}"), doc
    assert found["content-type"] == "application/problem+json"
    if status == 401:
        assert found["www-authenticate"].startswith("Bearer")
    if case == "event too big":
        assert doc["index"] == 0


def test_a_publisher_over_its_rate_gets_429_with_retry_after(limited: HeraldServer) -> None:
    auth = f"Authorization: Bearer {token('chats/*', sub='rate-e2e')}"
    url = f"{limited.url}/topics/chats/rate/events"
    statuses = []
    for _ in range(3):  # 5 batches of 5 in one second is over 20; a window that ends between them gets another try
        # each try starts just after a window begins (windows are whole seconds of the clock): a try must not
        # find the events of the one before it counted, and all five batches fall in one window unless slow
        time.sleep(1.02 - time.time() % 1)
        statuses = [curl_post(url, events(5), auth)[0] for _ in range(5)]
        if 429 in statuses:
            break
    assert statuses[:4] == [200] * 4 and statuses[4] == 429, statuses
    got, found, doc = curl_post(url, events(5), auth)
    if got == 429:
        assert found["retry-after"] == "1" and doc["limit"] == 20
    metrics = httpx.get(f"{limited.url}/metrics").text
    assert 'herald_limited_total{reason="publish-rate"} 0.0' not in metrics


# Two gateways on Redis -----------------------------------------------------------------------------

DB = 7
"""The Redis database of this module's gateways (the per-test ``redis_url`` flushes database 0)."""


@pytest.fixture(scope="module")
def gateways(redis_server: RedisServer) -> Iterator[tuple[HeraldServer, HeraldServer]]:
    """Two gateway processes on the same Redis, with the same secret and publisher key (each test its own topics)."""
    with redis_server.client(DB) as client:
        client.flushdb()
    env = {"REDIS_URL": redis_server.url(DB), "HERALD_PUBLISH_JWT_SECRET": PUBLISH_KEY, "HERALD_PUBLISH_RATE": "50"}
    with HeraldServer(env) as first, HeraldServer(env) as second:
        yield first, second


def publish(server: HeraldServer, topic: str, body: Any, *, sub: str = "backend",
            headers: dict[str, str] | None = None) -> httpx.Response:
    """POST ``body`` to ``topic`` on ``server`` with a publisher token for every topic."""
    return httpx.post(f"{server.url}/topics/{topic}/events", json=body,
                      headers={"Authorization": f"Bearer {token('**', sub=sub)}", **(headers or {})}, timeout=10)


@pytest.mark.redis
async def test_published_on_one_gateway_followed_on_the_other_and_resumed_across_them(
    gateways: tuple[HeraldServer, HeraldServer],
) -> None:
    first, second = gateways
    topic = "chats/across"
    async with httpx.AsyncClient(timeout=10) as client:
        on_second = (await client.get(f"{second.url}/chats/across")).json()["subscribe_url"]
        async with sse_connect(client, f"{second.url}{on_second}") as stream:
            assert (await stream.next_block()).retry is not None
            answer = publish(first, topic, [{"type": "Tick", "data": i} for i in range(3)])
            assert answer.status_code == 200, answer.text
            got = await stream.messages(3)
        cursors = [e["cursor"] for e in answer.json()["events"]]
        assert [(b.id, b.event, b.json()["data"]) for b in got] == [
            (cursor, "Tick", i) for i, cursor in enumerate(cursors)]
        later = publish(second, topic, [{"type": "Tock", "data": i} for i in range(2)])
        assert later.status_code == 200, later.text
        on_first = (await client.get(f"{first.url}/chats/across")).json()["subscribe_url"]
        async with sse_connect(client, f"{first.url}{on_first}", headers={"Last-Event-ID": cursors[-1]}) as stream:
            missed = await stream.messages(2)
        assert [(b.id, b.event) for b in missed] == [(e["cursor"], "Tock") for e in later.json()["events"]]


@pytest.mark.redis
def test_a_batch_retried_on_the_other_gateway_lands_once(
    gateways: tuple[HeraldServer, HeraldServer], redis_server: RedisServer,
) -> None:
    first, second = gateways
    batch = [{"type": "Tick", "data": i} for i in range(4)]
    key = {"Idempotency-Key": "nightly-2024-05-01"}
    answer = publish(first, "chats/idem", batch, headers=key)
    retried = publish(second, "chats/idem", batch, headers=key)
    assert answer.status_code == retried.status_code == 200, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json() == answer.json()
    with redis_server.client(DB) as client:
        assert client.xlen("herald:topic:{chats/idem}") == 4
    other = publish(second, "chats/idem", [*batch, {"type": "Tick", "data": 4}], headers=key)
    assert other.status_code == 422


@pytest.mark.redis
def test_one_publishers_rate_is_counted_across_gateways(gateways: tuple[HeraldServer, HeraldServer]) -> None:
    first, second = gateways
    statuses: list[int] = []
    for attempt in range(2):  # 40 + 40 events in one second is over 50 (a window ending between them: again)
        sub = f"rate-{attempt}"
        statuses = [publish(first, "chats/r", [{"type": "T"}] * 40, sub=sub).status_code,
                    publish(second, "chats/r", [{"type": "T"}] * 40, sub=sub).status_code]
        if statuses[1] == 429:
            break
    assert statuses == [200, 429]
