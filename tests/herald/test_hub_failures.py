"""A subscriber that fails costs nobody else a frame, and never reaches the broker that publishes.

No sockets: subscribers are parked in ``next_batch`` as a stream's coroutine is between writes,
and frames come through a :class:`MemoryBroker`, which hands them to the hub synchronously, inside
``publish`` and inside ``transition``: a failure that escaped the hub would escape into those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from herald.broker.memory import MemoryBroker
from herald.events import build_event
from herald.hub import Hub, Subscriber
from herald.operations import Operation, Status, new_operation_id, operation_topic
from herald.protocol import Frame
from herald.worker import Context, Worker

ROOM = "chats/room"


class Parked:
    """A subscriber parked in ``next_batch`` with a direct write that records what it wrote."""

    def __init__(self, direct: Callable[[Frame], bool] | None = None) -> None:
        self.sub = Subscriber(max_queue=10)
        self.written: list[str] = []
        self.sub.direct = direct or self._record
        self.task: asyncio.Task[list[object]] | None = None

    def _record(self, frame: Frame) -> bool:
        self.written.append(frame.type)
        return True

    async def park(self) -> None:
        self.task = asyncio.ensure_future(self.sub.next_batch())
        await asyncio.sleep(0)

    async def queued(self) -> list[str]:
        """The types of the frames the stream's coroutine was woken for (its next batch)."""
        assert self.task is not None
        batch = await asyncio.wait_for(self.task, 1)
        return [f.type for f in batch if isinstance(f, Frame)]


def failing(frame: Frame) -> bool:
    raise AttributeError("'RequestResponseCycle' object has no attribute 'response_started'")


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(history_size=10)


async def test_a_direct_write_that_raises_counts_as_not_written_and_the_frame_takes_the_queue(
    broker: MemoryBroker,
) -> None:
    hub = Hub(broker, heartbeat=60)
    others = [Parked() for _ in range(3)]
    broken = Parked(failing)
    for one in [*others, broken]:
        await hub.follow(one.sub, ROOM, None, from_start=False)
        await one.park()
    await broker.publish(ROOM, build_event("First", {}, source="test"))  # returns: nothing reached the broker
    assert [one.written for one in others] == [["First"]] * 3
    assert await broken.queued() == ["First"]
    assert broken.sub.direct is None  # that connection goes on without the direct write
    assert not broken.sub.closed
    await broken.park()
    await broker.publish(ROOM, build_event("Second", {}, source="test"))
    assert await broken.queued() == ["Second"]
    assert [one.written for one in others] == [["First", "Second"]] * 3


class BrokenSubscriber(Subscriber):
    """A subscriber whose ``push`` has a bug."""

    def push(self, frame: Frame) -> None:
        raise RuntimeError("a bug in push")


async def test_a_subscriber_whose_push_raises_is_closed_and_the_others_still_get_the_frame(
    broker: MemoryBroker,
) -> None:
    hub = Hub(broker, heartbeat=60)
    alone = BrokenSubscriber(max_queue=10)
    await hub.follow(alone, "chats/alone", None, from_start=False)
    await broker.publish("chats/alone", build_event("T", {}, source="test"))
    assert alone.closed and alone.reason == "error"  # its client resumes from its cursor

    subs = [Subscriber(max_queue=10) for _ in range(4)]
    broken = BrokenSubscriber(max_queue=10)
    for sub in [*subs[:2], broken, *subs[2:]]:
        await hub.follow(sub, ROOM, None, from_start=False)
    cursor = await broker.publish(ROOM, build_event("T", {}, source="test"))
    assert [[f.cursor for f in sub.queue if isinstance(f, Frame)] for sub in subs] == [[cursor]] * 4
    assert broken.closed and broken.reason == "error"


async def test_an_operation_ends_whole_and_every_follower_gets_its_events_when_one_direct_write_raises(
    broker: MemoryBroker,
) -> None:
    hub = Hub(broker, heartbeat=60)
    op_id = new_operation_id()
    request = build_event("ThingRequested", {}, source="test", correlationid=op_id)
    await broker.accept(Operation(id=op_id, type="ThingRequested", request_event_id=request.id), request)
    topic = operation_topic(op_id)
    followers = {topic: [Parked(), Parked(failing), Parked()], ROOM: [Parked(), Parked(failing), Parked()]}

    async def handle(ctx: Context) -> None:
        # they follow from now on (after "running") and are idle when the end goes out
        for name, parked in followers.items():
            for one in parked:
                await hub.follow(one.sub, name, None, from_start=False)
                await one.park()
        ctx.stage("ThingDone", {"ok": True}, topics=[ROOM])
        await ctx.succeed({"ok": True})

    worker = Worker(broker, {"ThingRequested": handle}, poll=0.05)
    await asyncio.wait_for(worker.run(burst=True), 10)

    op = await broker.get_operation(op_id)
    assert op is not None and op.status is Status.SUCCEEDED
    assert [s.event.type for s in (await broker.read(topic, None)).events] == [
        "herald.operation.running", "ThingDone", "herald.operation.succeeded"]
    assert [s.event.type for s in (await broker.read(ROOM, None)).events] == ["ThingDone"]
    ok, broken, ok2 = followers[topic]
    assert ok.written == ok2.written == ["ThingDone", "herald.operation.succeeded"]
    assert await broken.queued() == ["ThingDone", "herald.operation.succeeded"]
    ok, broken, ok2 = followers[ROOM]
    assert ok.written == ok2.written == ["ThingDone"]
    assert await broken.queued() == ["ThingDone"]
