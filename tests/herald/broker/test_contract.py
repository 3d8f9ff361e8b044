"""The broker contract: every test body runs against the memory broker, a real Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from herald.broker import create_broker
from herald.broker.base import Broker, Delivery, HistoryPage, IdempotencyConflict, OperationNotFound
from herald.operations import IllegalTransition, Operation, Status, operation_topic
from herald.protocol import Frame, format_cursor, parse_cursor, split_cursor
from tests.herald.broker.helpers import REQUEST, command, event, eventually

VISIBILITY = 0.3
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

MakeBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("cluster", marks=pytest.mark.redis)])
def broker_url(request: pytest.FixtureRequest) -> str:
    """``memory://``, the URL of the test session's Redis, or of its Redis Cluster."""
    if request.param == "memory":
        return "memory://"
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def make_broker(broker_url: str) -> AsyncIterator[MakeBroker]:
    """Build started brokers of the backend under test (small history, short visibility); closes them after."""
    made: list[Broker] = []

    async def make(**options: Any) -> Broker:
        defaults: dict[str, Any] = {"history_size": 5, "visibility_timeout": VISIBILITY}
        broker = create_broker(broker_url, **{**defaults, **options})
        await broker.start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
async def broker(make_broker: MakeBroker) -> Broker:
    """One started broker of the backend under test."""
    return await make_broker()


# Request events ------------------------------------------------------------------------

async def test_each_request_event_goes_to_exactly_one_of_two_consumers(broker: Broker) -> None:
    queued: dict[str, str] = {}
    for n in range(6):
        op, request = command(n=n)
        assert (await broker.accept(op, request)).created
        queued[request.id] = op.id
    got: dict[str, list[str]] = {"a": [], "b": []}

    async def work(name: str) -> None:
        deadline = time.monotonic() + 5
        while sum(map(len, got.values())) < len(queued) and time.monotonic() < deadline:
            for delivery in await broker.consume([REQUEST], name, block=0.2):
                assert delivery.deliveries == 1
                got[name].append(delivery.event.id)
                await broker.ack(delivery)

    await asyncio.gather(work("a"), work("b"))
    everything = got["a"] + got["b"]
    assert sorted(everything) == sorted(queued)  # all of them, none twice
    # acknowledged work never comes back, even after the visibility timeout
    assert await broker.consume([REQUEST], "a", block=VISIBILITY * 2) == []


async def test_request_event_is_delivered_intact(broker: Broker) -> None:
    op, request = command(text="hello")
    await broker.accept(op, request)
    [delivery] = await broker.consume([REQUEST], "w", block=1)
    assert delivery.event == request
    assert delivery.event.correlationid == op.id
    assert await broker.consume(["SomethingElse"], "w", block=0) == []


async def test_unacknowledged_delivery_comes_back_after_the_visibility_timeout(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    [first] = await broker.consume([REQUEST], "w1", block=1)
    assert first.deliveries == 1
    assert await broker.consume([REQUEST], "w2", block=0) == []  # still invisible
    started = time.monotonic()
    [again] = await broker.consume([REQUEST], "w2", block=3)
    assert time.monotonic() - started >= VISIBILITY * 0.5
    assert again.event.id == request.id
    assert again.deliveries == 2
    await broker.ack(again)
    assert await broker.consume([REQUEST], "w1", block=VISIBILITY * 2) == []


async def test_a_late_ack_of_a_timed_out_delivery_still_removes_it(broker: Broker) -> None:
    # a worker stalled past the visibility timeout finishes after all: its ack must stick even though the
    # request was already made available again (and not yet taken), or the finished work runs a second time
    for _ in range(2):
        await broker.accept(*command())
    first = await broker.consume([REQUEST], "w1", count=2, block=1)
    assert len(first) == 2
    await asyncio.sleep(VISIBILITY * 1.5)
    [taken] = await broker.consume([REQUEST], "w2", count=1, block=1)  # reclaims; one is taken, one left
    [late] = [d for d in first if d.event.id != taken.event.id]
    await broker.ack(late)
    await broker.ack(taken)
    assert await broker.consume([REQUEST], "w3", count=2, block=VISIBILITY * 2) == []


async def test_released_delivery_is_available_at_once(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    [first] = await broker.consume([REQUEST], "w1", block=1)
    await broker.release(first)
    started = time.monotonic()
    [again] = await broker.consume([REQUEST], "w2", block=0)
    assert time.monotonic() - started < VISIBILITY
    assert again.event.id == request.id
    assert again.deliveries == 2


async def test_an_extended_delivery_stays_with_its_consumer_until_it_is_no_longer_extended(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(visibility_timeout=1.0)
    op, request = command()
    await broker.accept(op, request)
    [held] = await broker.consume([REQUEST], "w1", block=1)
    for _ in range(6):  # 1.2 s in all, past the visibility timeout, extended every 0.2 s
        await asyncio.sleep(0.2)
        assert await broker.extend([held], "w1") == []
        assert await broker.consume([REQUEST], "w2", block=0) == []
    [again] = await broker.consume([REQUEST], "w2", block=3)  # no longer extended: it comes back
    assert (again.event.id, again.deliveries) == (request.id, 2)
    assert await broker.extend([held], "w1") == [held], "w1's lease is gone and stays gone"
    assert await broker.extend([again], "w2") == []


async def test_consume_takes_at_most_count(broker: Broker) -> None:
    for _ in range(3):
        await broker.accept(*command())
    first = await broker.consume([REQUEST], "w", count=2, block=1)
    assert len(first) == 2
    rest = await broker.consume([REQUEST], "w", count=5, block=0.2)
    assert len(rest) == 1
    assert {d.event.id for d in first}.isdisjoint({d.event.id for d in rest})


async def test_consume_over_several_types_takes_count_in_all(broker: Broker) -> None:
    await broker.accept(*command("ThingRequested"))
    await broker.accept(*command("OtherThingRequested"))
    both = ["ThingRequested", "OtherThingRequested"]
    [first] = await broker.consume(both, "w", count=1, block=1)
    [second] = await broker.consume(both, "w", count=1, block=1)
    assert {first.event.type, second.event.type} == set(both)
    assert (first.deliveries, second.deliveries) == (1, 1)  # what the first call left was never handed out
    assert await broker.consume(both, "w", count=1, block=0) == []


# Idempotency ---------------------------------------------------------------------------

async def test_same_idempotency_key_and_fingerprint_returns_the_first_operation(broker: Broker) -> None:
    op, request = command(op_id=broker.operation_id("k1"))
    first = await broker.accept(op, request, idempotency_key="k1", fingerprint="body-a")
    retry_op, retry_request = command(op_id=broker.operation_id("k1"))
    again = await broker.accept(retry_op, retry_request, idempotency_key="k1", fingerprint="body-a")
    assert first.created and not again.created
    assert again.operation.id == op.id
    assert await broker.get_operation(retry_op.id) is None
    deliveries = await broker.consume([REQUEST], "w", count=10, block=0.2)
    assert [d.event.id for d in deliveries] == [request.id]  # the retry queued nothing


async def test_same_idempotency_key_with_another_fingerprint_conflicts(broker: Broker) -> None:
    op, request = command(op_id=broker.operation_id("k2"))
    await broker.accept(op, request, idempotency_key="k2", fingerprint="body-a")
    other_op, other_request = command(op_id=broker.operation_id("k2"))
    with pytest.raises(IdempotencyConflict) as caught:
        await broker.accept(other_op, other_request, idempotency_key="k2", fingerprint="body-b")
    assert caught.value.operation_id == op.id
    assert await broker.get_operation(other_op.id) is None


# Operations ----------------------------------------------------------------------------

async def test_operation_is_stored_as_accepted(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    assert await broker.get_operation(op.id) == op
    assert await broker.get_operation("op_unknown") is None


async def test_transitions_follow_the_state_machine(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    running = await broker.transition(op.id, Status.RUNNING)
    assert (running.status, running.version, running.attempts) == (Status.RUNNING, 2, 1)
    assert running.etag != op.etag
    done = await broker.transition(op.id, Status.SUCCEEDED, result={"ok": True}, location="/things/1")
    assert (done.status, done.version, done.result, done.location) == (Status.SUCCEEDED, 3, {"ok": True}, "/things/1")
    assert await broker.get_operation(op.id) == done
    for status in (Status.RUNNING, Status.FAILED, Status.SUCCEEDED, Status.CANCELED):
        with pytest.raises(IllegalTransition):
            await broker.transition(op.id, status)
    assert await broker.get_operation(op.id) == done  # a terminal state is never overwritten


async def test_racing_transitions_end_an_operation_exactly_once(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    endings = [Status.SUCCEEDED, Status.FAILED, Status.CANCELED] * 3
    results = await asyncio.gather(*(broker.transition(op.id, s) for s in endings), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, IllegalTransition) for r in results if r is not winners[0])
    assert await broker.get_operation(op.id) == winners[0]
    page = await broker.read(operation_topic(op.id), None)
    assert [s.event.type for s in page.events] == [f"herald.operation.{winners[0].status.value}"]


async def test_racing_transitions_lose_no_update(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    await asyncio.gather(*(broker.transition(op.id, Status.RUNNING) for _ in range(5)))
    stored = await broker.get_operation(op.id)
    assert stored is not None and (stored.version, stored.attempts) == (6, 5)
    page = await broker.read(operation_topic(op.id), None)
    assert [s.event.data["attempts"] for s in page.events] == [1, 2, 3, 4, 5]


async def test_pending_may_end_directly_and_failure_carries_a_problem(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    failed = await broker.transition(op.id, Status.FAILED, error={"type": "about:blank", "title": "no", "status": 500})
    assert failed.error == {"type": "about:blank", "title": "no", "status": 500}
    assert (await broker.get_operation(op.id)) == failed


async def test_every_transition_appends_its_status_event_to_the_operation_topic(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    await broker.transition(op.id, Status.RUNNING, traceparent=TRACEPARENT)
    await broker.transition(op.id, Status.SUCCEEDED, result=42)
    page = await broker.read(operation_topic(op.id), None)
    assert [s.event.type for s in page.events] == ["herald.operation.running", "herald.operation.succeeded"]
    running, succeeded = (s.event for s in page.events)
    assert running.traceparent == TRACEPARENT
    assert succeeded.data["result"] == 42 and succeeded.data["status"] == "succeeded"
    assert {e.correlationid for e in (running, succeeded)} == {op.id}
    assert {e.causationid for e in (running, succeeded)} == {request.id}
    assert not page.truncated


async def test_transition_of_an_unknown_operation_is_not_found(broker: Broker) -> None:
    with pytest.raises(OperationNotFound):
        await broker.transition("op_missing", Status.RUNNING)
    with pytest.raises(OperationNotFound):
        await broker.request_cancel("op_missing")


async def test_request_cancel_sets_the_flag_until_the_operation_ends(broker: Broker) -> None:
    op, request = command()
    await broker.accept(op, request)
    flagged = await broker.request_cancel(op.id)
    assert flagged.cancel_requested and flagged.version == 2 and flagged.status is Status.PENDING
    assert await broker.request_cancel(op.id) == flagged  # asking twice changes nothing
    assert await broker.get_operation(op.id) == flagged
    assert (await broker.read(operation_topic(op.id), None)).events == []  # the flag alone publishes nothing
    canceled = await broker.transition(op.id, Status.CANCELED)
    assert canceled.cancel_requested and canceled.version == 3
    with pytest.raises(IllegalTransition):
        await broker.request_cancel(op.id)


async def test_operations_expire_after_their_ttl(make_broker: MakeBroker) -> None:
    broker = await make_broker(operation_ttl=0.4)
    op, request = command(op_id=broker.operation_id("k3"))
    await broker.accept(op, request, idempotency_key="k3", fingerprint="f")
    assert await broker.get_operation(op.id) is not None
    await asyncio.sleep(0.6)
    assert await broker.get_operation(op.id) is None
    with pytest.raises(OperationNotFound):
        await broker.transition(op.id, Status.RUNNING)
    # the idempotency key expired with it: the same key makes a new operation
    fresh_op, fresh_request = command(op_id=broker.operation_id("k3"))
    assert (await broker.accept(fresh_op, fresh_request, idempotency_key="k3", fingerprint="f")).created


# Ending an operation with its events and the request's ack in one step ------------------

async def held_running(broker: Broker) -> tuple[Delivery, Operation]:
    """A new operation whose request a consumer holds, moved to ``running``."""
    op, request = command()
    await broker.accept(op, request)
    [delivery] = await broker.consume([REQUEST], "w", block=1)
    return delivery, await broker.transition(op.id, Status.RUNNING)


async def types_on(broker: Broker, topic: str) -> list[str]:
    """The event types kept in a topic, oldest first."""
    return [s.event.type for s in (await broker.read(topic, None)).events]


async def test_a_transition_publishes_its_events_before_its_status_event_and_acks_the_request(
    broker: Broker,
) -> None:
    frames: list[Frame] = []
    broker.set_sink(frames.append)
    await broker.subscribe("chats/room")
    delivery, running = await held_running(broker)
    topic = operation_topic(running.id)
    first, second = event(1), event(2, "OtherThingHappened")
    done = await broker.transition(running.id, Status.SUCCEEDED, result=7, current=running,
                                   events=[(topic, first), ("chats/room", first), (topic, second)], ack=delivery)
    assert (done.status, done.result, done.version) == (Status.SUCCEEDED, 7, running.version + 1)
    assert await broker.get_operation(running.id) == done
    page = await broker.read(topic, None)
    assert [s.event.type for s in page.events] == [
        "herald.operation.running", "ThingHappened", "OtherThingHappened", "herald.operation.succeeded"
    ]
    assert [s.event for s in page.events[1:3]] == [first, second]
    [elsewhere] = (await broker.read("chats/room", None)).events
    assert elsewhere.event == first
    await eventually(lambda: len(frames) >= 1)  # fanned out like a publish
    assert [(f.topic, f.cursor, f.encoded) for f in frames] == [("chats/room", elsewhere.cursor, first.encoded)]
    # acknowledged with the move: never handed out again, even after the visibility timeout
    assert await broker.consume([REQUEST], "w2", block=VISIBILITY * 2) == []


async def test_a_sink_that_raises_neither_fails_nor_splits_a_transition_or_a_publish(broker: Broker) -> None:
    handed: list[tuple[str, str]] = []

    def sink(frame: Frame) -> None:
        handed.append((frame.topic, frame.type))
        raise RuntimeError("a receiver's bug")

    broker.set_sink(sink)
    delivery, running = await held_running(broker)
    topic = operation_topic(running.id)
    await broker.subscribe(topic)
    await broker.subscribe("chats/room")
    happened = event(1)
    done = await broker.transition(running.id, Status.SUCCEEDED, current=running,
                                   events=[(topic, happened), ("chats/room", happened)], ack=delivery)
    assert done.status is Status.SUCCEEDED
    assert await broker.get_operation(running.id) == done
    assert await types_on(broker, topic) == ["herald.operation.running", "ThingHappened", "herald.operation.succeeded"]
    assert await types_on(broker, "chats/room") == ["ThingHappened"]
    await broker.publish("chats/room", event(2))
    await eventually(lambda: len(handed) >= 4)  # every frame was handed over, the failures notwithstanding
    assert sorted(handed) == [("chats/room", "ThingHappened"), ("chats/room", "ThingHappened"),
                              (topic, "ThingHappened"), (topic, "herald.operation.succeeded")]
    assert await broker.consume([REQUEST], "w2", block=VISIBILITY * 2) == []  # acknowledged with the end


async def test_a_transition_retried_on_a_stale_copy_publishes_its_events_once_and_acks(broker: Broker) -> None:
    delivery, running = await held_running(broker)
    topic = operation_topic(running.id)
    await broker.request_cancel(running.id)  # the version moves on: ``running`` is now a stale copy
    happened = event(1)
    done = await broker.transition(running.id, Status.SUCCEEDED, current=running,
                                   events=[(topic, happened), ("chats/stale", happened)], ack=delivery)
    assert done.cancel_requested and done.version == running.version + 2  # read again, then applied
    assert await types_on(broker, topic) == [
        "herald.operation.running", "ThingHappened", "herald.operation.succeeded"
    ]
    assert [s.event for s in (await broker.read("chats/stale", None)).events] == [happened]
    assert await broker.consume([REQUEST], "w2", block=VISIBILITY * 2) == []


@pytest.mark.parametrize("copy", ["none", "forged"])
async def test_an_illegal_transition_publishes_nothing_but_acks_the_request(broker: Broker, copy: str) -> None:
    delivery, running = await held_running(broker)
    topic = operation_topic(running.id)
    done = await broker.transition(running.id, Status.SUCCEEDED, current=running)
    # "forged": a copy of the stored version that still says running, so only the store's own check refuses
    current = dataclasses.replace(done, status=Status.RUNNING) if copy == "forged" else None
    with pytest.raises(IllegalTransition):
        await broker.transition(running.id, Status.FAILED, current=current,
                                events=[(topic, event(1)), ("chats/illegal", event(2))], ack=delivery)
    assert await broker.get_operation(running.id) == done
    assert await types_on(broker, topic) == ["herald.operation.running", "herald.operation.succeeded"]
    assert await types_on(broker, "chats/illegal") == []
    assert await broker.consume([REQUEST], "w2", block=VISIBILITY * 2) == []


@pytest.mark.parametrize("copy", ["none", "held"])
async def test_a_transition_of_an_expired_operation_publishes_nothing_but_acks_the_request(
    make_broker: MakeBroker, copy: str
) -> None:
    broker = await make_broker(operation_ttl=0.4, visibility_timeout=5)
    delivery, running = await held_running(broker)
    await asyncio.sleep(0.6)
    # "held": the worker's copy, so no read comes first and the store finds the operation gone
    with pytest.raises(OperationNotFound):
        await broker.transition(running.id, Status.SUCCEEDED, current=running if copy == "held" else None,
                                events=[("chats/expired", event(1))], ack=delivery)
    assert await types_on(broker, "chats/expired") == []
    assert await broker.extend([delivery], "w") == [delivery]  # no longer held by anyone: acknowledged


# Topics --------------------------------------------------------------------------------

async def test_publish_returns_increasing_cursors_that_read_tail_and_head_agree_on(broker: Broker) -> None:
    assert await broker.head("chats/empty") is None
    assert await broker.tail("chats/empty", 3) == []
    sent = [event(n) for n in range(3)]
    cursors = [await broker.publish("chats/a", e) for e in sent]
    assert [parse_cursor(c) for c in cursors] == sorted({parse_cursor(c) for c in cursors})  # strictly increasing
    assert await broker.head("chats/a") == cursors[-1]
    tail = await broker.tail("chats/a", 2)
    assert [(s.cursor, s.event) for s in tail] == list(zip(cursors[1:], sent[1:], strict=True))
    assert [s.cursor for s in await broker.tail("chats/a", 0)] == []
    page = await broker.read("chats/a", None)
    assert [(s.topic, s.cursor, s.event) for s in page.events] == [
        ("chats/a", c, e) for c, e in zip(cursors, sent, strict=True)
    ]
    assert (page.truncated, page.oldest) == (False, cursors[0])


async def test_read_after_a_cursor_returns_exactly_the_later_events(broker: Broker) -> None:
    cursors = [await broker.publish("chats/b", event(n)) for n in range(4)]
    after_first = await broker.read("chats/b", cursors[0])
    assert [s.cursor for s in after_first.events] == cursors[1:]
    assert not after_first.truncated
    assert (await broker.read("chats/b", cursors[-1])).events == []
    limited = await broker.read("chats/b", None, limit=2)
    assert [s.cursor for s in limited.events] == cursors[:2]
    assert await broker.read("chats/never", None) == await broker.read("chats/never", "1-0")
    assert (await broker.read("chats/never", None)).events == []


async def test_truncation_is_reported_exactly(broker: Broker) -> None:
    cursors = [await broker.publish("chats/c", event(n)) for n in range(5)]  # history_size is 5
    full = await broker.read("chats/c", None)
    assert ([s.cursor for s in full.events], full.truncated) == (cursors, False)
    cursors += [await broker.publish("chats/c", event(n)) for n in (5, 6)]  # drops cursors[0] and [1]
    kept = cursors[2:]
    page = await broker.read("chats/c", None)
    assert ([s.cursor for s in page.events], page.truncated, page.oldest) == (kept, True, kept[0])
    # the newest dropped event is the cursor: nothing after it is missing
    page = await broker.read("chats/c", cursors[1])
    assert ([s.cursor for s in page.events], page.truncated) == (kept, False)
    # one older: cursors[1] was lost in between
    page = await broker.read("chats/c", cursors[0])
    assert ([s.cursor for s in page.events], page.truncated) == (kept, True)
    page = await broker.read("chats/c", kept[0])
    assert ([s.cursor for s in page.events], page.truncated) == (kept[1:], False)
    assert [s.cursor for s in await broker.tail("chats/c", 10)] == kept


async def test_every_cursor_of_a_history_names_its_epoch_and_a_history_made_again_gets_another(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(history_ttl=0.3)
    first = [await broker.publish("chats/e", event(n)) for n in range(2)]
    epochs = {split_cursor(c)[1] for c in first}
    assert len(epochs) == 1 and None not in epochs
    assert {split_cursor(s.cursor)[1] for s in (await broker.read("chats/e", None)).events} == epochs
    assert split_cursor(await broker.head("chats/e") or "")[1] in epochs
    await asyncio.sleep(0.5)  # the history expires: the next event starts another one
    again = await broker.publish("chats/e", event(2))
    assert split_cursor(again)[1] not in epochs


async def test_a_cursor_of_a_lost_history_reads_as_a_gap_from_the_start_of_the_new_one(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(history_ttl=0.3)
    old = [await broker.publish("chats/lost", event(n)) for n in range(3)]
    await asyncio.sleep(0.5)
    gone = await broker.read("chats/lost", old[-1])  # no history at all now, while the cursor names one
    assert (gone.events, gone.truncated, gone.reset, gone.oldest) == ([], True, True, None)
    new = [await broker.publish("chats/lost", event(n)) for n in range(3, 5)]
    for cursor in (old[0], old[-1]):
        page = await broker.read("chats/lost", cursor)
        assert ([s.cursor for s in page.events], page.truncated, page.reset, page.oldest) == (new, True, True, new[0])
    # a cursor of the current history reads as always
    page = await broker.read("chats/lost", new[0])
    assert ([s.cursor for s in page.events], page.truncated, page.reset) == (new[1:], False, False)


async def test_a_cursor_naming_an_epoch_the_topic_never_had_reads_as_a_gap(broker: Broker) -> None:
    cursors = [await broker.publish("chats/forged", event(n)) for n in range(2)]
    position, epoch = split_cursor(cursors[0])
    other = format_cursor(position, "zzzzzzzz" if epoch != "zzzzzzzz" else "0")
    page = await broker.read("chats/forged", other)
    assert ([s.cursor for s in page.events], page.truncated, page.reset) == (cursors, True, True)
    assert (await broker.read("chats/never", other)).reset


async def test_a_plain_cursor_without_an_epoch_reads_as_before_epochs(make_broker: MakeBroker) -> None:
    broker = await make_broker(history_ttl=0.3)
    cursors = [await broker.publish("chats/plain", event(n)) for n in range(3)]
    plain = [format_cursor(parse_cursor(c)) for c in cursors]
    page = await broker.read("chats/plain", plain[0])
    assert ([s.cursor for s in page.events], page.truncated, page.reset) == (cursors[1:], False, False)
    await asyncio.sleep(0.5)
    assert await broker.read("chats/plain", plain[-1]) == HistoryPage(events=[], truncated=False, oldest=None)
    new = await broker.publish("chats/plain", event(3))
    page = await broker.read("chats/plain", plain[-1])  # no epoch, no check: what is after it, as before
    assert ([s.cursor for s in page.events], page.truncated, page.reset) == ([new], False, False)


async def test_subscribed_frames_reach_the_sink_in_order_until_unsubscribed(broker: Broker) -> None:
    frames: list[Frame] = []
    broker.set_sink(frames.append)
    await broker.subscribe("chats/d")
    sent = [event(n) for n in range(3)]
    cursors = [await broker.publish("chats/d", e) for e in sent]
    await broker.publish("chats/elsewhere", event(99))
    await eventually(lambda: len(frames) >= 3)
    assert [(f.topic, f.cursor, f.type, f.encoded, f.terminal) for f in frames] == [
        ("chats/d", c, "ThingHappened", e.encoded, False) for c, e in zip(cursors, sent, strict=True)
    ]
    await broker.unsubscribe("chats/d")
    await broker.publish("chats/d", event(3))
    await asyncio.sleep(0.2)
    assert len(frames) == 3


async def test_status_frames_of_an_operation_mark_the_terminal_one(broker: Broker) -> None:
    frames: list[Frame] = []
    broker.set_sink(frames.append)
    op, request = command()
    await broker.accept(op, request)
    await broker.subscribe(operation_topic(op.id))
    await broker.transition(op.id, Status.RUNNING)
    await broker.transition(op.id, Status.SUCCEEDED)
    await eventually(lambda: len(frames) >= 2)
    assert [(f.type, f.terminal) for f in frames] == [
        ("herald.operation.running", False),
        ("herald.operation.succeeded", True),
    ]
    history = await broker.read(operation_topic(op.id), None)
    assert [f.cursor for f in frames] == [s.cursor for s in history.events]


# Resources -----------------------------------------------------------------------------

async def test_resources_are_kept_until_their_ttl(broker: Broker) -> None:
    document = {"id": "m1", "text": "hello", "tags": ["a"]}
    await broker.put_resource("/chats/lobby/messages/m1", document, ttl=1)
    assert await broker.get_resource("/chats/lobby/messages/m1") == document
    assert await broker.get_resource("/chats/lobby/messages/m2") is None
    await asyncio.sleep(1.1)
    assert await broker.get_resource("/chats/lobby/messages/m1") is None


async def test_put_resource_if_absent_stores_once_and_returns_what_is_stored(broker: Broker) -> None:
    path = "/chats/lobby/messages/m1"
    first = {"id": "m1", "text": "first", "tags": ["a"]}
    assert await broker.put_resource_if_absent(path, first, ttl=60) == first
    assert await broker.get_resource(path) == first
    # a second writer (a redelivered handler) gets the first document back and changes nothing
    assert await broker.put_resource_if_absent(path, {"id": "m1", "text": "second"}, ttl=60) == first
    assert await broker.get_resource(path) == first


async def test_put_resource_if_absent_is_atomic_among_racing_writers(broker: Broker) -> None:
    path = "/chats/race/messages/m1"
    results = await asyncio.gather(
        *(broker.put_resource_if_absent(path, {"id": "m1", "writer": n}, ttl=60) for n in range(8))
    )
    stored = await broker.get_resource(path)
    assert stored is not None
    assert all(result == stored for result in results)  # every writer saw the one that won


async def test_put_resource_if_absent_keeps_the_first_ttl_and_stores_again_once_expired(broker: Broker) -> None:
    path = "/chats/lobby/messages/m2"
    await broker.put_resource_if_absent(path, {"v": 1}, ttl=1)
    await asyncio.sleep(0.6)
    assert await broker.put_resource_if_absent(path, {"v": 2}, ttl=1) == {"v": 1}  # does not renew the TTL
    await asyncio.sleep(0.6)
    assert await broker.get_resource(path) is None  # gone 1 s after the first write
    assert await broker.put_resource_if_absent(path, {"v": 3}, ttl=60) == {"v": 3}
    assert await broker.get_resource(path) == {"v": 3}


def _add(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A change that appends ``name`` to the document's ``names``."""
    return lambda doc: {**doc, "names": [*doc["names"], name]}


async def test_update_resource_stores_and_returns_the_changed_document(broker: Broker) -> None:
    path = "/things/t1"
    await broker.put_resource(path, {"id": "t1", "names": []}, ttl=60)
    assert await broker.update_resource(path, _add("ann"), ttl=60) == {"id": "t1", "names": ["ann"]}
    assert await broker.get_resource(path) == {"id": "t1", "names": ["ann"]}


async def test_update_resource_of_a_missing_path_is_none_and_stores_nothing(broker: Broker) -> None:
    called: list[dict[str, Any]] = []

    def change(doc: dict[str, Any]) -> dict[str, Any]:
        called.append(doc)
        return {"created": True}

    assert await broker.update_resource("/things/none", change, ttl=60) is None
    assert called == []
    assert await broker.get_resource("/things/none") is None


async def test_update_resource_whose_change_returns_none_leaves_the_document(broker: Broker) -> None:
    path = "/things/t2"
    await broker.put_resource(path, {"id": "t2", "names": ["ann"]}, ttl=1)
    assert await broker.update_resource(path, lambda doc: None, ttl=60) == {"id": "t2", "names": ["ann"]}
    assert await broker.get_resource(path) == {"id": "t2", "names": ["ann"]}
    await asyncio.sleep(1.1)
    assert await broker.get_resource(path) is None  # left alone: its TTL was not renewed either


async def test_concurrent_updates_of_a_resource_lose_none(broker: Broker) -> None:
    path = "/things/crowd"
    await broker.put_resource(path, {"id": "crowd", "names": []}, ttl=60)
    names = [f"n{i:02d}" for i in range(20)]
    await asyncio.gather(*(broker.update_resource(path, _add(name), ttl=60) for name in names))
    stored = await broker.get_resource(path)
    assert stored is not None
    assert sorted(stored["names"]) == names


async def test_hit_adds_a_batch_to_the_counter_and_the_counter_ends_with_its_window(broker: Broker) -> None:
    assert await broker.hit("publish:test", 1) == 1
    assert await broker.hit("publish:test", 1, 50) == 51  # a published batch counts its events
    assert await broker.hit("other", 1, 3) == 3
    await asyncio.sleep(1.1)
    assert await broker.hit("publish:test", 1, 2) == 2
