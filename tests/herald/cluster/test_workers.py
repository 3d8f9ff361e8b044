"""Worker processes under faults: SIGKILL mid-job, a handler that kills its process, SIGTERM.

The workers run ``tests.herald.cluster.handlers`` (a job's text says whether it sleeps or crashes);
each invocation counts itself in Redis and publishes a progress event naming its worker, so
a test knows who holds a job before it kills that process, and how often the job ran.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.herald.cluster.support import Cluster, Received, SSEListener, WorkerProcess, eventually, stored

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(120)]

FAULTY = "tests.herald.cluster.handlers:FaultSettings"
SHORT_GRACE = "tests.herald.cluster.handlers:ShortGraceSettings"
TERMINAL = ("herald.operation.succeeded", "herald.operation.failed", "herald.operation.canceled")


async def send(base: str, text: str, room: str = "chats/jobs") -> str:
    """POST a message whose text drives the test handler; the operation id."""
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{base}/{room}/messages", json={"author": "test", "text": text})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def history(cluster: Cluster, op_id: str) -> list[Received]:
    """The operation's events as Redis stored them."""
    with cluster.client() as client:
        return stored(client, f"operations/{op_id}")


def of_type(events: list[Received], *types: str) -> list[Received]:
    """The events of these types."""
    return [e for e in events if e.type in types]


def invocations(cluster: Cluster, op_id: str) -> int:
    """How many times a handler started on the operation (the handler's own counter in Redis)."""
    with cluster.client() as client:
        return int(client.get(f"herald:count:{{invocations:{op_id}}}") or 0)


async def holder(cluster: Cluster, op_id: str, workers: list[WorkerProcess], attempt: int = 1) -> WorkerProcess:
    """The worker whose handler announced ``attempt`` of the operation."""
    def announced() -> list[Any]:
        return [e.event["data"] for e in of_type(history(cluster, op_id), "herald.operation.progress")
                if e.event["data"]["invocation"] == attempt]

    await eventually(lambda: bool(announced()), 15, f"attempt {attempt} of {op_id} started")
    [progress] = announced()
    return next(w for w in workers if w.alive and w.source == progress["worker"])


async def test_a_worker_killed_mid_job_leaves_it_to_the_other_and_the_operation_ends_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    # the job sleeps 2 s on its first attempt only, and the visibility timeout (3 s) is longer:
    # it is redelivered because its worker died, not because it ran long
    cluster = make_cluster(HERALD_VISIBILITY_TIMEOUT="3")
    gateway = await cluster.gateway()
    workers = list(await asyncio.gather(cluster.worker(FAULTY), cluster.worker(FAULTY)))
    op_id = await send(gateway.url, "sleep-first 2")
    follower = SSEListener([gateway.url], [f"operations/{op_id}"],
                           end_on=lambda s: any(e.type in TERMINAL for e in s.all)).start()
    first = await holder(cluster, op_id, workers)
    first.kill()
    other = next(w for w in workers if w is not first)
    second = await holder(cluster, op_id, workers, attempt=2)
    await eventually(lambda: follower.done, 15, "the operation's stream ended")

    events = history(cluster, op_id)
    print(f"attempt 1 on {first.name} (SIGKILLed), attempt 2 on {second.name}: "
          f"{[(e.type, e.event['source']) for e in events]}")
    assert second is other
    assert [e.type for e in of_type(events, *TERMINAL)] == ["herald.operation.succeeded"]
    assert [e.event["data"]["attempts"] for e in of_type(events, "herald.operation.running")] == [1, 2]
    [delivered] = of_type(events, "ChatMessageDelivered")
    assert delivered.event["source"] == other.source
    assert delivered.event["data"]["written_by"] == other.source, "the side effect was made once, by the survivor"
    assert invocations(cluster, op_id) == 2
    assert [(e.cursor, e.type) for e in follower.all] == [(e.cursor, e.type) for e in events]
    with cluster.client() as client:
        assert client.xpending("herald:req:{ChatMessageSent}", "herald-workers")["pending"] == 0
    await follower.close()


async def test_a_job_that_outlasts_the_visibility_timeout_stays_with_its_living_worker(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(HERALD_VISIBILITY_TIMEOUT="1")
    gateway = await cluster.gateway()
    workers = list(await asyncio.gather(cluster.worker(FAULTY), cluster.worker(FAULTY)))
    op_id = await send(gateway.url, "sleep 3")  # three visibility timeouts
    first = await holder(cluster, op_id, workers)
    await eventually(lambda: bool(of_type(history(cluster, op_id), *TERMINAL)), 15, "the long job done")

    events = history(cluster, op_id)
    print(f"a 3 s job with a 1 s visibility timeout: {[(e.type, e.event['source']) for e in events]}")
    assert invocations(cluster, op_id) == 1, "its worker kept the lease: nobody ran it a second time"
    assert [e.event["data"]["attempts"] for e in of_type(events, "herald.operation.running")] == [1]
    assert [e.event["source"] for e in of_type(events, "ChatMessageDelivered")] == [first.source]


async def test_a_handler_that_always_crashes_its_process_fails_the_operation_after_max_attempts(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(HERALD_VISIBILITY_TIMEOUT="1", HERALD_MAX_ATTEMPTS="3")
    gateway = await cluster.gateway()
    workers = list(await asyncio.gather(cluster.worker(FAULTY), cluster.worker(FAULTY)))
    op_id = await send(gateway.url, "crash")
    exits: list[int | None] = []
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for _ in range(200):  # supervise, as systemd or Kubernetes would: restart whatever died
            doc = (await http.get(f"/operations/{op_id}", params={"view": "status"})).json()
            if doc["status"] in ("succeeded", "failed", "canceled"):
                break
            for worker in workers:
                if worker.process is not None and not worker.alive:
                    exits.append(worker.process.returncode)
                    await asyncio.to_thread(worker.start)
            await asyncio.sleep(0.1)

    events = history(cluster, op_id)
    print(f"worker exits {exits}; final {doc['status']}: {doc['error']}")
    assert doc["status"] == "failed"
    assert doc["error"]["type"].endswith("/attempts-exhausted") and doc["error"]["attempts"] == 3
    assert exits == [3, 3, 3], "each of the three attempts took its process down"
    assert invocations(cluster, op_id) == 3
    assert [e.event["data"]["attempts"] for e in of_type(events, "herald.operation.running")] == [1, 2, 3]
    assert [e.type for e in of_type(events, *TERMINAL)] == ["herald.operation.failed"]
    with cluster.client() as client:
        assert client.xlen("herald:req:{ChatMessageSent}") == 0, "the request was settled, not left queued"


async def test_sigterm_lets_the_job_in_hand_finish_and_takes_no_new_one(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(HERALD_VISIBILITY_TIMEOUT="30")
    gateway = await cluster.gateway()
    leaving = await cluster.worker(FAULTY)  # a grace of 10 s
    slow = await send(gateway.url, "sleep 1.5")
    await holder(cluster, slow, [leaving])
    leaving.terminate()
    later = await send(gateway.url, "quick")
    code = await asyncio.to_thread(leaving.wait, 10)
    assert code == 0
    stayed_pending = not history(cluster, later)
    arriving = await cluster.worker(FAULTY)
    await eventually(lambda: bool(of_type(history(cluster, later), *TERMINAL)), 15, "the later job done")

    first, second = history(cluster, slow), history(cluster, later)
    print(f"in hand at SIGTERM: {[(e.type, e.event['source']) for e in first]}; "
          f"sent after: {[(e.type, e.event['source']) for e in second]}")
    assert [e.type for e in of_type(first, *TERMINAL)] == ["herald.operation.succeeded"]
    assert [e.event["source"] for e in of_type(first, "ChatMessageDelivered")] == [leaving.source]
    assert invocations(cluster, slow) == 1
    assert stayed_pending, "the stopping worker did not start the job sent after SIGTERM"
    assert [e.event["source"] for e in of_type(second, "ChatMessageDelivered")] == [arriving.source]
    assert [e.event["data"]["attempts"] for e in of_type(second, "herald.operation.running")] == [1]


async def test_sigterm_gives_back_a_job_that_outlasts_the_grace_and_another_worker_takes_it_at_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    # a visibility timeout of 30 s: only the release can bring the job back within the bound below
    cluster = make_cluster(HERALD_VISIBILITY_TIMEOUT="30")
    gateway = await cluster.gateway()
    leaving = await cluster.worker(SHORT_GRACE)  # a grace of 0.5 s
    op_id = await send(gateway.url, "sleep-first 30")
    await holder(cluster, op_id, [leaving])
    leaving.terminate()
    code = await asyncio.to_thread(leaving.wait, 10)
    assert code == 0
    arriving = await cluster.worker(FAULTY)
    await eventually(lambda: bool(of_type(history(cluster, op_id), *TERMINAL)), 10, "the job done by the other")

    events = history(cluster, op_id)
    print(f"given back after the grace and taken by {arriving.name}: {[(e.type, e.event['source']) for e in events]}")
    assert [e.type for e in of_type(events, *TERMINAL)] == ["herald.operation.succeeded"]
    assert [e.event["data"]["attempts"] for e in of_type(events, "herald.operation.running")] == [1, 2]
    [delivered] = of_type(events, "ChatMessageDelivered")
    assert delivered.event["source"] == arriving.source
    assert invocations(cluster, op_id) == 2
