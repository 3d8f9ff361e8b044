"""The command proxy end to end: ``herald serve --config`` in front of a real upstream process.

Every test runs twice: on the embedded default (one ``herald serve --config`` process, memory broker,
its worker in-process) and on Redis (a ``herald serve --config`` gateway and two ``herald worker
--config`` processes). The upstream (:mod:`tests.herald.proxy.upstream`) is a uvicorn process of its
own that records what it gets, so the tests check what Herald sent it, how often and when, besides
what a client of the gateway sees: each row of the outcomes table, retries and their spacing, the
callback API, the callback token refused for another operation, cancels, and proxied reads. On Redis
one more: a worker killed while its upstream call is in flight, and the request redelivered with the
same ``ce-id``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from herald.auth import TokenSigner
from tests.herald.cluster.support import WorkerProcess, cluster_env
from tests.herald.proxy.support import Upstream, config_text, events_of, first_event, wait_ended
from tests.support.redis_server import RedisServer
from tests.support.server import TEST_SECRET, HeraldServer

pytestmark = pytest.mark.e2e

SLACK = 2.0
"""Seconds a retry may come later than its backoff says (a loaded machine; on Redis, a reclaim's poll)."""


@dataclass
class Proxied:
    """One setup under test: the gateway, its workers (on Redis) and the upstream."""

    mode: str
    gateway: HeraldServer
    upstream: Upstream
    redis: RedisServer | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The gateway."""
        return self.gateway.url

    def logs(self) -> str:
        """The end of each process's log."""
        parts = [f"--- gateway\n{self.gateway.log()[-3000:]}"]
        parts += [f"--- worker {w.names}\n{w.log()[-3000:]}" for w in self.workers]
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every process."""
        for worker in self.workers:
            worker.stop()
        self.gateway.stop()
        if self.redis is not None:
            self.redis.cleanup()


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def proxied(request: pytest.FixtureRequest, upstream: Upstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    """``herald serve --config`` in front of the upstream, on the memory broker or on Redis with two workers."""
    config = tmp_path_factory.mktemp("proxy") / "herald.toml"
    config.write_text(config_text(upstream.url))
    target = ("--config", str(config))
    if request.param == "memory":
        setup = Proxied("memory", HeraldServer({"HERALD_LOG_LEVEL": "warning"}, target=target), upstream)
        setup.gateway.start()
    else:
        server = RedisServer()
        server.start()
        env = cluster_env(server.url())
        gateway = HeraldServer(env, target=target)
        setup = Proxied("redis", gateway, upstream, server)
        try:
            gateway.start()
            for _ in range(2):
                worker = WorkerProcess({**env, "HERALD_CALLBACK_URL": gateway.url}, target, concurrency=4)
                setup.workers.append(worker)
                worker.start()
        except BaseException:
            setup.stop()
            raise
    yield setup
    setup.stop()
    print(setup.logs())


@pytest.fixture
async def client(proxied: Proxied) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway."""
    async with httpx.AsyncClient(base_url=proxied.url, timeout=10) as http:
        yield http


async def submit(client: httpx.AsyncClient, path: str, body: Any = None) -> dict[str, Any]:
    """POST a proxied command; its 202 body."""
    response = await client.post(path, json={"size": 64} if body is None else body)
    assert response.status_code == 202, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def calls(upstream: Upstream, op_id: str, *, at_least: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The upstream's requests for one operation (by ``ce-correlationid``), once there are ``at_least``."""
    async with asyncio.timeout(timeout):
        while True:
            got = [e for e in await upstream.arequests() if e.get("headers", {}).get("ce-correlationid") == op_id]
            if len(got) >= at_least:
                return got
            await asyncio.sleep(0.05)


def progress(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The data of the ``herald.operation.progress`` events."""
    return [e["data"] for e in events if e["type"] == "herald.operation.progress"]


# The outcomes table ----------------------------------------------------------------------------

async def test_a_2xx_succeeds_with_the_body_as_result_and_its_location_as_the_303(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    accepted = await submit(client, "/fast", {"size": 128})
    op_id = accepted["id"]
    done = await wait_ended(client, op_id)
    assert (done["status"], done["result"]) == ("succeeded", {"done": True, "echo": {"size": 128}})
    [call] = await calls(proxied.upstream, op_id)
    headers = call["headers"]
    redirect = await client.get(f"/operations/{op_id}")
    assert (redirect.status_code, redirect.headers["location"]) == (303, f"/things/{headers['ce-id']}")
    # the CloudEvents binary mode: the request event's attributes as headers, its data as the body
    assert call["body"] == '{"size":128}' and headers["content-type"] == "application/json"
    assert (headers["ce-specversion"], headers["ce-type"], headers["ce-source"]) == ("1.0", "ThingFastRequested",
                                                                                     "herald/fast")
    assert headers["ce-correlationid"] == op_id and headers["ce-time"].endswith("Z")
    assert len(headers["traceparent"].split("-")) == 4
    assert headers["herald-callback"] == f"{proxied.url}/operations/{op_id}"
    grant = TokenSigner(TEST_SECRET).verify_callback(headers["herald-callback-token"], op_id)
    assert grant.topics == {f"things/{op_id}"}
    events = await events_of(client, accepted)
    assert progress(events) == [{"attempt": 1, "attempts": 5, "reason": "the upstream answered 201"}]
    status_event = events[-1]
    assert (status_event["type"], status_event["causationid"]) == ("herald.operation.succeeded", headers["ce-id"])


async def test_a_202_leaves_the_operation_running_until_the_upstream_reports_through_the_callback(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    accepted = await submit(client, "/slow")
    op_id = accepted["id"]
    [call] = await calls(proxied.upstream, op_id)
    now = (await client.get(f"/operations/{op_id}", params={"view": "status"})).json()
    assert now["status"] == "running"  # the upstream reports after a second
    done = await wait_ended(client, op_id)
    ce_id = call["headers"]["ce-id"]
    assert (done["status"], done["result"], done["location"]) == ("succeeded", {"made": ce_id}, f"/things/{ce_id}")
    events = await events_of(client, accepted)
    assert [e["type"] for e in events] == ["herald.operation.running", "herald.operation.progress",
                                           "ThingProgressed", "herald.operation.succeeded"]
    upstream_event = events[2]
    assert (upstream_event["id"], upstream_event["correlationid"], upstream_event["data"]) == (
        f"progress-{ce_id}", op_id, {"percent": 50})
    callbacks = [e["status"] for e in await proxied.upstream.arequests() if e["method"] == "CALLBACK"]
    assert 200 in callbacks


async def test_a_202_then_a_failed_result_fails_the_operation(client: httpx.AsyncClient) -> None:
    accepted = await submit(client, "/slow-failing")
    done = await wait_ended(client, accepted["id"])
    assert done["status"] == "failed"
    assert (done["error"]["title"], done["error"]["status"]) == ("Could not make it", 422)


async def test_another_4xx_fails_with_the_upstreams_problem_passed_through(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    done = await wait_ended(client, (await submit(client, "/refusing"))["id"])
    assert done["status"] == "failed"
    assert done["error"] == {"type": "https://upstream.example/problems/bad-size", "title": "Size not supported",
                             "status": 422, "detail": "sizes are 64, 128 or 256", "sizes": [64, 128, 256]}
    plain = await wait_ended(client, (await submit(client, "/refusing-plain"))["id"])
    assert plain["error"]["type"] == "https://herald.dev/problems/upstream-refused"
    assert (plain["error"]["status"], plain["error"]["body"]) == (404, "no such album")
    assert len(await calls(proxied.upstream, plain["id"])) == 1  # never retried


async def test_5xx_is_retried_with_exponential_backoff_and_the_same_ce_id(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    accepted = await submit(client, "/failing")
    done = await wait_ended(client, accepted["id"])
    assert (done["status"], done["result"]) == ("succeeded", {"attempt": 3})
    tries = await calls(proxied.upstream, accepted["id"], at_least=3)
    assert len(tries) == 3
    assert len({t["headers"]["ce-id"] for t in tries}) == 1
    assert [t["headers"]["herald-attempt"] for t in tries] == ["1", "2", "3"]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(tries)]
    # backoff = { initial = 0.4 }: the first wait is 0.2-0.4 s, the second 0.4-0.8 s (jitter)
    assert 0.2 <= gaps[0] <= 0.4 + SLACK, gaps
    assert 0.4 <= gaps[1] <= 0.8 + SLACK, gaps
    steps = progress(await events_of(client, accepted))
    assert [(p["attempt"], p["reason"]) for p in steps] == [
        (1, "the upstream answered 500"), (2, "the upstream answered 500"), (3, "the upstream answered 200")]
    assert 0.2 <= steps[0]["retry_in"] <= 0.4 and 0.4 <= steps[1]["retry_in"] <= 0.8


async def test_429_waits_for_its_retry_after(proxied: Proxied, client: httpx.AsyncClient) -> None:
    accepted = await submit(client, "/busy")
    done = await wait_ended(client, accepted["id"])
    assert (done["status"], done["result"]) == ("succeeded", {"attempt": 2})
    first, second = await calls(proxied.upstream, accepted["id"], at_least=2)
    assert 1.0 <= second["t"] - first["t"] <= 1.0 + SLACK  # the backoff alone would be 0.05 s


async def test_an_upstream_that_does_not_answer_in_time_exhausts_the_attempts(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    accepted = await submit(client, "/hanging")
    done = await wait_ended(client, accepted["id"])
    assert done["status"] == "failed"
    error = done["error"]
    assert (error["type"], error["status"], error["attempts"]) == (
        "https://herald.dev/problems/attempts-exhausted", 502, 2)
    assert "no answer from the upstream within 0.5 s" in error["detail"]
    assert len(await calls(proxied.upstream, accepted["id"], at_least=2)) == 2
    steps = progress(await events_of(client, accepted))
    assert [(p["attempt"], p["attempts"]) for p in steps] == [(1, 2), (2, 2)]


# The callback API --------------------------------------------------------------------------------

async def test_the_callback_token_of_one_operation_is_refused_for_another(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    first, second = await submit(client, "/waiting"), await submit(client, "/waiting")
    [call] = await calls(proxied.upstream, first["id"])
    await calls(proxied.upstream, second["id"])
    auth = {"Authorization": "Bearer " + call["headers"]["herald-callback-token"]}
    refused = await client.post(f"/operations/{second['id']}/result", headers=auth, json={"status": "succeeded"})
    assert refused.status_code == 403, refused.text
    assert (await client.get(f"/operations/{second['id']}", params={"view": "status"})).json()["status"] == "running"
    done = await client.post(f"{call['headers']['herald-callback']}/result", headers=auth,
                             json={"status": "succeeded", "result": {"ok": 1}})
    assert (done.status_code, done.json()["status"]) == (200, "succeeded")
    again = await client.post(f"/operations/{first['id']}/result", headers=auth, json={"status": "succeeded"})
    assert again.status_code == 409


# Cancel ---------------------------------------------------------------------------------------------

async def test_a_cancel_is_forwarded_to_the_cancel_url_the_upstream_gave(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    accepted = await submit(client, "/waiting")
    [call] = await calls(proxied.upstream, accepted["id"])
    await first_event(client, accepted, "herald.operation.progress")  # published once the cancel URL is stored
    response = await client.delete(f"/operations/{accepted['id']}")
    assert (response.status_code, response.json()["status"]) == (200, "canceled")
    deletes = [e for e in await proxied.upstream.arequests() if e["method"] == "DELETE"]
    assert f"/jobs/{call['headers']['ce-id']}" in [e["path"] for e in deletes]
    assert (await client.delete(f"/operations/{accepted['id']}")).status_code == 409


async def test_a_cancel_goes_to_the_declared_cancel_url_when_the_upstream_gave_none(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    accepted = await submit(client, "/declared-cancel/job-7")
    await first_event(client, accepted, "herald.operation.progress")  # handed off: the upstream has it
    response = await client.delete(f"/operations/{accepted['id']}")
    assert (response.status_code, response.json()["status"]) == (200, "canceled")
    assert "/jobs/job-7" in [e["path"] for e in await proxied.upstream.arequests() if e["method"] == "DELETE"]


# Proxied reads ----------------------------------------------------------------------------------------

async def test_a_read_route_passes_the_upstreams_answer_on(client: httpx.AsyncClient) -> None:
    response = await client.get("/things/lamp", params={"color": "red"})
    assert response.status_code == 200
    assert response.json() == {"thing": "lamp", "query": "color=red"}
    assert response.headers["etag"] == '"v1"' and "x-internal" not in response.headers
    missing = await client.get("/things/lamp", params={"status": "404"})
    assert missing.status_code == 404


# Redis only: a worker dies mid-call ---------------------------------------------------------------------

async def test_a_worker_killed_mid_call_is_replaced_and_the_upstream_sees_the_same_ce_id(
    proxied: Proxied, client: httpx.AsyncClient,
) -> None:
    if proxied.mode != "redis":
        pytest.skip("the embedded worker dies with its gateway")
    assert proxied.redis is not None
    accepted = await submit(client, "/sticky")
    [first] = await calls(proxied.upstream, accepted["id"])  # the upstream holds this call for a minute
    holder = _holder(proxied.redis, "ThingStickyRequested")
    victim = next(w for w in proxied.workers if w.name == holder)
    victim.kill()
    try:
        done = await wait_ended(client, accepted["id"], timeout=20)
        assert (done["status"], done["result"]) == ("succeeded", {"attempt": 2})
        first_call, second_call = await calls(proxied.upstream, accepted["id"], at_least=2)
        assert first_call["headers"]["ce-id"] == second_call["headers"]["ce-id"] == first["headers"]["ce-id"]
        assert second_call["headers"]["herald-attempt"] == "2"
    finally:
        await asyncio.to_thread(victim.start)


def _holder(server: RedisServer, event_type: str) -> str:
    """The consumer (worker name) holding the one pending request of ``event_type``."""
    with redis.Redis(host="127.0.0.1", port=server.port) as client:
        pending: Any = client.xpending_range(f"herald:req:{{{event_type}}}", "herald-workers", "-", "+", 10)
    [entry] = pending
    name: bytes | str = entry["consumer"]
    return name.decode() if isinstance(name, bytes) else name


def test_the_config_file_is_the_one_served(proxied: Proxied) -> None:
    assert Path(proxied.gateway.target[1]).read_text().startswith('name = "things"')
