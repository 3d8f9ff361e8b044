"""The worker SDK against a real app: correlated emits, staged events, Retry, Failed, exceptions, cancel, attempts.

The app runs without its embedded worker; each test runs a :class:`Worker` of its own with
test handlers for ``ChatMessageSent``, in burst mode so it ends when the work is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from herald.broker.base import Delivery
from herald.operations import operation_topic
from herald.worker import HANDLER_ERROR_DETAIL, Context, Failed, Handler, Retry, Worker
from tests.herald.http.harness import Herald


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` (the memory broker) or the URL of the test session's Redis."""
    return None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def quick_herald(make_herald: Callable[..., Awaitable[Herald]], broker_url: str | None) -> Herald:
    """An app without its embedded worker, on either broker, whose unacknowledged requests come back fast."""
    return await make_herald(embedded_worker=False, visibility_timeout=0.2, redis_url=broker_url)


async def run_worker(herald: Herald, handler: Handler, **options: Any) -> Worker:
    """Run a burst worker with ``handler`` for ``ChatMessageSent`` until no work is left."""
    worker = Worker(herald.broker, {"ChatMessageSent": handler}, poll=0.05, **options)
    await asyncio.wait_for(worker.run(burst=True), 10)
    return worker


async def submit(herald: Herald, text: str = "hello") -> str:
    """POST a message; the operation id."""
    response = await herald.send(text=text)
    assert response.status_code == 202
    op_id: str = response.json()["id"]
    return op_id


async def topic_types(herald: Herald, topic: str) -> list[str]:
    """The event types kept in a topic, oldest first."""
    page = await herald.broker.read(topic, None)
    return [stored.event.type for stored in page.events]


async def test_emit_publishes_correlated_events_to_the_operation_and_domain_topics(idle_herald: Herald) -> None:
    op_id = await submit(idle_herald)

    async def handler(ctx: Context) -> None:
        await ctx.progress({"done": 50})
        await ctx.emit("ThingHappened", {"x": 1}, topics=["chats/elsewhere"], subject="things/1")
        await ctx.succeed({"ok": True}, location="/things/1")

    await run_worker(idle_herald, handler)
    page = await idle_herald.broker.read(operation_topic(op_id), None)
    events = [s.event for s in page.events]
    assert [e.type for e in events] == ["herald.operation.running", "herald.operation.progress", "ThingHappened",
                                         "herald.operation.succeeded"]
    request_id = events[0].causationid
    assert request_id is not None
    for event in events:
        assert event.correlationid == op_id
        assert event.causationid == request_id
    assert events[2].subject == "things/1"
    (elsewhere,) = (await idle_herald.broker.read("chats/elsewhere", None)).events
    assert elsewhere.event is events[2]  # the same event, encoded once, on both topics
    doc = await idle_herald.wait_status(op_id, "succeeded")
    assert doc["result"] == {"ok": True}
    assert doc["location"] == "/things/1"


async def test_a_handler_that_returns_succeeds_with_its_return_value(idle_herald: Herald) -> None:
    op_id = await submit(idle_herald)

    async def handler(ctx: Context) -> dict[str, int]:
        return {"answer": 42}

    await run_worker(idle_herald, handler)
    doc = await idle_herald.wait_status(op_id, "succeeded")
    assert doc["result"] == {"answer": 42}
    # no location: nothing to redirect to
    assert (await idle_herald.client.get(f"/operations/{op_id}")).status_code == 200


async def test_an_exception_fails_the_operation_with_a_problem_and_the_worker_carries_on(idle_herald: Herald) -> None:
    bad, good = await submit(idle_herald, "boom"), await submit(idle_herald, "fine")

    async def handler(ctx: Context) -> str:
        if ctx.data["text"] == "boom":
            raise RuntimeError("kaput")
        return "ok"

    worker = await run_worker(idle_herald, handler, concurrency=1)
    failed = await idle_herald.wait_status(bad, "failed")
    assert failed["error"] == {
        "type": "https://herald.dev/problems/handler-error",
        "title": "The worker's handler failed",
        "status": 500,
        "detail": HANDLER_ERROR_DETAIL,  # not "RuntimeError: kaput": the exception's text stays in the log
    }
    assert (await idle_herald.wait_status(good, "succeeded"))["result"] == "ok"
    assert worker.handled == 2
    assert (await topic_types(idle_herald, operation_topic(bad)))[-1] == "herald.operation.failed"


async def test_failed_ends_the_operation_with_the_given_problem(idle_herald: Herald) -> None:
    op_id = await submit(idle_herald)

    async def handler(ctx: Context) -> None:
        raise Failed("Room is closed", "nobody may post in lobby now", status=409,
                     type="https://example.test/problems/closed")

    await run_worker(idle_herald, handler)
    doc = await idle_herald.wait_status(op_id, "failed")
    assert doc["error"] == {"type": "https://example.test/problems/closed", "title": "Room is closed",
                            "status": 409, "detail": "nobody may post in lobby now"}


async def test_ctx_fail_ends_the_operation_failed(idle_herald: Herald) -> None:
    op_id = await submit(idle_herald)

    async def handler(ctx: Context) -> None:
        await ctx.fail("Nope", "not today")

    await run_worker(idle_herald, handler)
    assert (await idle_herald.wait_status(op_id, "failed"))["error"]["detail"] == "not today"


async def test_retry_hands_the_request_out_again(quick_herald: Herald) -> None:
    op_id = await submit(quick_herald)
    calls: list[int] = []

    async def handler(ctx: Context) -> str:
        calls.append(ctx.operation.attempts)
        if len(calls) == 1:
            raise Retry()
        return "second time lucky"

    await run_worker(quick_herald, handler)
    assert calls == [1, 2]
    assert (await quick_herald.wait_status(op_id, "succeeded"))["result"] == "second time lucky"
    assert await topic_types(quick_herald, operation_topic(op_id)) == [
        "herald.operation.running", "herald.operation.running", "herald.operation.succeeded"
    ]


async def test_attempts_exhausted_fails_the_operation(quick_herald: Herald) -> None:
    op_id = await submit(quick_herald)
    calls = 0

    async def handler(ctx: Context) -> None:
        nonlocal calls
        calls += 1
        raise Retry()

    await run_worker(quick_herald, handler, max_attempts=3)
    assert calls == 3
    doc = await quick_herald.wait_status(op_id, "failed")
    assert doc["error"]["type"] == "https://herald.dev/problems/attempts-exhausted"
    assert doc["error"]["attempts"] == 3


async def test_a_cancel_seen_by_the_handler_ends_it_canceled(idle_herald: Herald) -> None:
    op_id = await submit(idle_herald)

    async def handler(ctx: Context) -> None:
        await idle_herald.client.delete(f"/operations/{ctx.operation_id}")  # the client cancels meanwhile
        assert await ctx.cancel_requested()
        await ctx.canceled()

    await run_worker(idle_herald, handler)
    assert (await idle_herald.wait_status(op_id, "canceled"))["status"] == "canceled"


async def test_a_cancel_between_the_workers_read_and_its_move_to_running_still_stops_the_handler(
    idle_herald: Herald, monkeypatch: pytest.MonkeyPatch
) -> None:
    op_id = await submit(idle_herald)
    broker = idle_herald.broker
    read = broker.get_operation

    async def read_then_cancel(operation_id: str) -> Any:
        operation = await read(operation_id)  # the worker sees no cancel yet ...
        await broker.request_cancel(operation_id)  # ... and the client cancels right after
        return operation

    monkeypatch.setattr(broker, "get_operation", read_then_cancel)
    ran: list[str] = []

    async def handler(ctx: Context) -> None:
        ran.append(ctx.operation_id)  # no cancel check of its own, like the chat handler

    await run_worker(idle_herald, handler)
    monkeypatch.undo()
    assert ran == []
    assert (await idle_herald.wait_status(op_id, "canceled"))["status"] == "canceled"


async def test_a_request_whose_handler_crashed_unacknowledged_is_redelivered(
    make_herald: Callable[..., Awaitable[Herald]],
) -> None:
    herald = await make_herald(embedded_worker=False, visibility_timeout=0.2)
    op_id = await submit(herald)
    # a consumer takes the request and dies before acknowledging it
    (taken,) = await herald.broker.consume(["ChatMessageSent"], "doomed", count=1, block=1)
    assert taken.deliveries == 1
    seen: list[int] = []

    async def handler(ctx: Context) -> None:
        seen.append(ctx.operation.attempts)

    worker = Worker(herald.broker, {"ChatMessageSent": handler}, poll=0.05)
    task = asyncio.ensure_future(worker.run())
    try:
        doc = await herald.wait_status(op_id, "succeeded")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)
    assert seen == [1]
    assert doc["id"] == op_id


async def test_competing_workers_handle_each_request_exactly_once(idle_herald: Herald) -> None:
    ids = [await submit(idle_herald, f"m{i}") for i in range(12)]
    handled: dict[str, list[str]] = {}

    def handler_for(name: str) -> Handler:
        async def handler(ctx: Context) -> None:
            handled.setdefault(ctx.operation_id, []).append(name)
            await asyncio.sleep(0.01)

        return handler

    workers = [Worker(idle_herald.broker, {"ChatMessageSent": handler_for(n)}, name=n, poll=0.05, concurrency=2)
               for n in ("w1", "w2")]
    await asyncio.wait_for(asyncio.gather(*(w.run(burst=True) for w in workers)), 10)
    assert sorted(handled) == sorted(ids)
    assert all(len(names) == 1 for names in handled.values())
    for op_id in ids:
        assert (await idle_herald.wait_status(op_id, "succeeded"))["status"] == "succeeded"


# Staged events: out with the operation's end and the request's ack, in one step -------------

REQUEST = "ChatMessageSent"


@pytest.fixture
def separate_acks(quick_herald: Herald, monkeypatch: pytest.MonkeyPatch) -> list[Delivery]:
    """The deliveries acknowledged by a call of their own (not with the operation's end)."""
    acks: list[Delivery] = []
    ack = quick_herald.broker.ack

    async def spy(delivery: Delivery) -> None:
        acks.append(delivery)
        await ack(delivery)

    monkeypatch.setattr(quick_herald.broker, "ack", spy)
    return acks


async def assert_acknowledged(herald: Herald) -> None:
    """No request comes back after the visibility timeout: each was acknowledged."""
    assert await herald.broker.consume([REQUEST], "checker", block=0.6) == []


async def test_staged_events_go_out_with_the_operations_end_and_its_ack(
    quick_herald: Herald, separate_acks: list[Delivery]
) -> None:
    op_id = await submit(quick_herald)
    topic = operation_topic(op_id)
    before_the_end: list[str] = []

    async def handler(ctx: Context) -> dict[str, bool]:
        await ctx.emit("ThingStarted", {"x": 0})  # emit stays immediate
        ctx.stage("ThingHappened", {"x": 1}, topics=["chats/elsewhere"], subject="things/1")
        before_the_end.extend(await topic_types(quick_herald, topic))
        return {"ok": True}

    await run_worker(quick_herald, handler)
    assert before_the_end == ["herald.operation.running", "ThingStarted"]  # the staged one was held back
    events = [s.event for s in (await quick_herald.broker.read(topic, None)).events]
    assert [e.type for e in events] == ["herald.operation.running", "ThingStarted", "ThingHappened",
                                         "herald.operation.succeeded"]
    staged = events[2]
    assert (staged.correlationid, staged.causationid, staged.subject) == (op_id, events[0].causationid, "things/1")
    assert [s.event for s in (await quick_herald.broker.read("chats/elsewhere", None)).events] == [staged]
    assert (await quick_herald.wait_status(op_id, "succeeded"))["result"] == {"ok": True}
    assert separate_acks == []  # acknowledged with the success
    await assert_acknowledged(quick_herald)


async def test_retry_discards_the_staged_events_of_its_attempt(
    quick_herald: Herald, separate_acks: list[Delivery]
) -> None:
    op_id = await submit(quick_herald)
    calls: list[int] = []

    async def handler(ctx: Context) -> str:
        calls.append(ctx.operation.attempts)
        ctx.stage("ThingHappened", {"attempt": len(calls)}, topics=["chats/elsewhere"])
        if len(calls) == 1:
            raise Retry()
        return "done"

    await run_worker(quick_herald, handler)
    assert calls == [1, 2]
    page = await quick_herald.broker.read(operation_topic(op_id), None)
    assert [(s.event.type, s.event.data.get("attempt")) for s in page.events] == [
        ("herald.operation.running", None), ("herald.operation.running", None), ("ThingHappened", 2),
        ("herald.operation.succeeded", None),
    ]
    elsewhere = (await quick_herald.broker.read("chats/elsewhere", None)).events
    assert [s.event.data for s in elsewhere] == [{"attempt": 2}]
    assert separate_acks == []
    await assert_acknowledged(quick_herald)


async def test_staged_events_go_out_with_a_failure_too(quick_herald: Herald, separate_acks: list[Delivery]) -> None:
    op_id = await submit(quick_herald)

    async def handler(ctx: Context) -> None:
        ctx.stage("ThingTried", {"x": 1})
        raise RuntimeError("kaput")

    await run_worker(quick_herald, handler)
    assert (await quick_herald.wait_status(op_id, "failed"))["error"]["detail"] == HANDLER_ERROR_DETAIL
    assert await topic_types(quick_herald, operation_topic(op_id)) == [
        "herald.operation.running", "ThingTried", "herald.operation.failed"
    ]
    assert separate_acks == []
    await assert_acknowledged(quick_herald)


async def test_the_workers_own_endings_acknowledge_the_request_in_the_same_step(
    quick_herald: Herald, separate_acks: list[Delivery]
) -> None:
    canceled = await submit(quick_herald, "cancel me")
    assert (await quick_herald.client.delete(f"/operations/{canceled}")).status_code == 202
    exhausted = await submit(quick_herald, "retry me")
    ran: list[str] = []

    async def handler(ctx: Context) -> None:
        ran.append(ctx.data["text"])
        raise Retry()

    await run_worker(quick_herald, handler, max_attempts=2)
    assert ran == ["retry me", "retry me"]  # the cancelled one never ran
    assert (await quick_herald.wait_status(canceled, "canceled"))["status"] == "canceled"
    doc = await quick_herald.wait_status(exhausted, "failed")
    assert doc["error"]["type"] == "https://herald.dev/problems/attempts-exhausted"
    assert separate_acks == []
    await assert_acknowledged(quick_herald)


async def test_stage_after_the_operation_ended_is_refused(idle_herald: Herald) -> None:
    await submit(idle_herald)
    refused: list[Exception] = []

    async def handler(ctx: Context) -> None:
        await ctx.succeed("done")
        try:
            ctx.stage("TooLate")
        except RuntimeError as exc:
            refused.append(exc)

    await run_worker(idle_herald, handler)
    assert len(refused) == 1
