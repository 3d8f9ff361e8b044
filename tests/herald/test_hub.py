"""The hub and its subscribers: dedupe by cursor, hold + replay, overflow, heartbeats.

No sockets: frames are pushed by hand, or published through a :class:`MemoryBroker`.
"""

from __future__ import annotations

import asyncio

import pytest

from herald.broker.memory import MemoryBroker
from herald.events import build_event
from herald.hub import HEARTBEAT, Gap, Hub, Subscriber
from herald.protocol import Frame


def frame(topic: str, ms: int, seq: int = 0, type_: str = "T") -> Frame:
    """A frame at cursor ``ms-seq``."""
    return Frame(topic, f"{ms}-{seq}", type_, b"{}")


def cursors(batch: list[object]) -> list[str]:
    """The cursors of the frames in a batch."""
    return [f.cursor for f in batch if isinstance(f, Frame)]


async def drain(sub: Subscriber) -> list[object]:
    """Everything queued right now (one batch), without waiting."""
    return await asyncio.wait_for(sub.next_batch(), 1.0)


# Subscriber --------------------------------------------------------------------------------


async def test_push_queues_in_order_and_next_batch_takes_all() -> None:
    sub = Subscriber(max_queue=10)
    for ms in (1, 2, 3):
        sub.push(frame("a", ms))
    assert cursors(await drain(sub)) == ["1-0", "2-0", "3-0"]
    assert not sub.queue


async def test_push_drops_repeats_and_older_cursors_per_topic() -> None:
    sub = Subscriber(max_queue=10)
    sub.push(frame("a", 5))
    sub.push(frame("a", 5))  # repeat
    sub.push(frame("a", 4))  # older
    sub.push(frame("b", 1))  # another topic has its own position
    sub.push(frame("a", 5, 1))
    assert [(f.topic, f.cursor) for f in await drain(sub)] == [("a", "5-0"), ("b", "1-0"), ("a", "5-1")]
    assert sub.positions == {"a": (5, 1), "b": (1, 0)}


async def test_next_batch_waits_for_a_push() -> None:
    sub = Subscriber(max_queue=10)
    waiter = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.push(frame("a", 1))
    assert cursors(await asyncio.wait_for(waiter, 1.0)) == ["1-0"]


async def test_hold_then_replay_gives_history_then_held_live_without_gaps_or_repeats() -> None:
    sub = Subscriber(max_queue=100)
    sub.hold("a", "2-0")
    # live frames arrive while the history is being read; some overlap with it
    sub.push(frame("a", 4))
    sub.push(frame("a", 5))
    sub.push(frame("b", 9))  # not held: goes straight through
    assert cursors(await drain(sub)) == ["9-0"]
    sub.replay("a", [frame("a", 1), frame("a", 2), frame("a", 3), frame("a", 4)])
    assert cursors(await drain(sub)) == ["3-0", "4-0", "5-0"]
    sub.push(frame("a", 5))
    sub.push(frame("a", 6))
    assert cursors(await drain(sub)) == ["6-0"]


async def test_hold_without_cursor_takes_the_whole_history() -> None:
    sub = Subscriber(max_queue=100)
    sub.hold("a", None)
    sub.push(frame("a", 3))
    sub.replay("a", [frame("a", 1), frame("a", 2), frame("a", 3)])
    assert cursors(await drain(sub)) == ["1-0", "2-0", "3-0"]


async def test_forget_stops_following() -> None:
    sub = Subscriber(max_queue=10)
    sub.hold("a", None)
    sub.forget("a")
    assert "a" not in sub.positions
    sub.replay("a", [])  # a late replay after forgetting is harmless


async def test_overflow_drops_the_queue_and_closes_as_slow_consumer() -> None:
    sub = Subscriber(max_queue=3)
    for ms in range(1, 4):
        sub.push(frame("a", ms))
    assert len(sub.queue) == 3
    sub.push(frame("a", 4))
    assert sub.closed
    assert sub.reason == "slow-consumer"
    assert sub.overflowed_at is not None
    assert not sub.queue  # memory is released at once
    sub.push(frame("a", 5))  # ignored once closed
    assert not sub.queue
    assert await drain(sub) == []


async def test_a_replayed_history_longer_than_the_queue_does_not_overflow_it() -> None:
    sub = Subscriber(max_queue=3)
    sub.hold("a", None)
    sub.replay("a", [frame("a", ms) for ms in range(1, 11)])
    assert not sub.closed
    for ms in (11, 12, 13):  # live frames still get the whole queue bound on top of the backlog
        sub.push(frame("a", ms))
    assert not sub.closed
    sub.push(frame("a", 14))
    assert sub.closed and sub.reason == "slow-consumer"


async def test_once_the_backlog_is_taken_live_frames_are_bounded_again() -> None:
    sub = Subscriber(max_queue=2)
    sub.hold("a", None)
    sub.replay("a", [frame("a", ms) for ms in range(1, 6)])
    assert cursors(await drain(sub)) == ["1-0", "2-0", "3-0", "4-0", "5-0"]
    sub.push(frame("a", 6))
    sub.push(frame("a", 7))
    assert not sub.closed
    sub.push(frame("a", 8))
    assert sub.closed


async def test_control_messages_keep_their_place_between_frames() -> None:
    sub = Subscriber(max_queue=10, transport="ws")
    sub.control('{"type":"subscribed"}')
    sub.push(frame("a", 1))
    sub.control('{"type":"pong"}')
    batch = await drain(sub)
    assert batch[0] == '{"type":"subscribed"}'
    assert isinstance(batch[1], Frame)
    assert batch[2] == '{"type":"pong"}'


async def test_heartbeat_is_sent_only_when_idle_and_once() -> None:
    sub = Subscriber(max_queue=10)
    sub.beat()
    sub.beat()
    assert await drain(sub) == [HEARTBEAT]
    sub.push(frame("a", 1))
    sub.beat()
    assert cursors(await drain(sub)) == ["1-0"]  # data already proves the stream is alive
    assert not sub.heartbeat_due
    waiter = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()


async def test_close_wakes_the_transport_with_an_empty_batch_and_keeps_the_first_reason() -> None:
    sub = Subscriber(max_queue=10)
    waiter = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0)
    sub.close("client-gone")
    sub.close("shutdown")
    assert await asyncio.wait_for(waiter, 1.0) == []
    assert sub.reason == "client-gone"


async def test_close_still_delivers_what_was_queued_first() -> None:
    sub = Subscriber(max_queue=10)
    sub.push(frame("a", 1))
    sub.close("shutdown")
    assert cursors(await drain(sub)) == ["1-0"]
    assert await drain(sub) == []


# Hub over a memory broker ---------------------------------------------------------------------


@pytest.fixture
async def broker() -> MemoryBroker:
    """A memory broker (no sweeper task needed here)."""
    return MemoryBroker(history_size=5)


async def publish(broker: MemoryBroker, topic: str, n: int) -> list[str]:
    """Publish ``n`` events to ``topic``; their cursors."""
    return [await broker.publish(topic, build_event("T", {"n": i}, source="test")) for i in range(n)]


async def test_follow_from_start_replays_history_then_live(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    old = await publish(broker, "operations/op_1", 2)
    sub = Subscriber(max_queue=100)
    await hub.follow(sub, "operations/op_1", None, from_start=True)
    new = await publish(broker, "operations/op_1", 1)
    assert cursors(await drain(sub)) == old + new
    await hub.leave(sub)
    assert hub.connections == 0
    assert hub.topic_count() == 0


async def test_follow_without_cursor_on_a_domain_topic_starts_live(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    old = await publish(broker, "chats/a", 3)
    sub = Subscriber(max_queue=100)
    seen: list[tuple[str | None, object]] = []
    await hub.follow(sub, "chats/a", None, from_start=False, announce=lambda start, page: seen.append((start, page)))
    new = await publish(broker, "chats/a", 2)
    assert cursors(await drain(sub)) == new
    assert seen == [(old[-1], None)]  # the transport learns where "live" began


async def test_follow_with_cursor_resumes_right_after_it(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    sent = await publish(broker, "chats/a", 4)
    sub = Subscriber(max_queue=100)
    page = await hub.follow(sub, "chats/a", sent[1], from_start=False)
    assert page is not None and not page.truncated
    assert cursors(await drain(sub)) == sent[2:]


async def test_follow_reports_truncated_history(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    sent = await publish(broker, "chats/a", 8)  # history keeps the newest 5
    sub = Subscriber(max_queue=100)
    page = await hub.follow(sub, "chats/a", sent[0], from_start=False)
    assert page is not None and page.truncated
    assert page.oldest == sent[3]
    assert cursors(await drain(sub)) == sent[3:]


async def test_follow_from_a_cursor_of_a_lost_history_replays_the_new_one_whole_even_from_older_positions(
    broker: MemoryBroker,
) -> None:
    hub = Hub(broker, heartbeat=60)
    sent = await publish(broker, "chats/a", 2)
    epoch = sent[0].rsplit(".", 1)[1]
    ahead = f"99999999999999-0.{'x' if epoch != 'x' else 'y'}"  # another history, at a later position
    sub = Subscriber(max_queue=100)
    page = await hub.follow(sub, "chats/a", ahead, from_start=False)
    assert page is not None and (page.truncated, page.reset, page.oldest) == (True, True, sent[0])
    live = await publish(broker, "chats/a", 1)
    assert cursors(await drain(sub)) == sent + live


async def test_a_gap_that_lost_the_history_names_the_old_cursor_and_lets_the_new_history_through() -> None:
    sub = Subscriber(max_queue=10)
    sub.push(Frame("a", "500-0.old", "T", b"{}"))
    await drain(sub)
    sub.gap("a", "400-0.new", epoch="old", reset=True)
    sub.push(Frame("a", "400-0.new", "T", b"{}"))  # older than the position it had: a new history
    batch = await drain(sub)
    assert batch[0] == Gap("a", "500-0.old", "400-0.new")
    assert cursors(batch) == ["400-0.new"]
    sub.gap("a", "450-0.new", epoch="new")  # a gap within one history keeps the position
    sub.push(Frame("a", "400-0.new", "T", b"{}"))
    batch = await drain(sub)
    assert batch == [Gap("a", "400-0.new", "450-0.new")]


async def test_one_live_frame_reaches_every_subscriber_of_its_topic_only(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    subs = [Subscriber(max_queue=10) for _ in range(3)]
    for sub in subs[:2]:
        await hub.follow(sub, "chats/a", None, from_start=False)
    await hub.follow(subs[2], "chats/b", None, from_start=False)
    (cursor,) = await publish(broker, "chats/a", 1)
    first, second = await drain(subs[0]), await drain(subs[1])
    assert cursors(first) == cursors(second) == [cursor]
    assert first[0] is second[0]  # the same frame object: framed once for everybody
    assert not subs[2].queue


async def test_a_slow_subscriber_does_not_hold_back_the_others(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    slow, fast = Subscriber(max_queue=2), Subscriber(max_queue=100)
    await hub.follow(slow, "chats/a", None, from_start=False)
    await hub.follow(fast, "chats/a", None, from_start=False)
    sent = await publish(broker, "chats/a", 5)
    assert slow.closed and slow.reason == "slow-consumer"
    assert cursors(await drain(fast)) == sent
    await hub.leave(slow)
    assert hub.slow_disconnects == 1


async def test_detach_unsubscribes_the_broker_when_the_last_local_subscriber_leaves(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=60)
    a, b = Subscriber(max_queue=10), Subscriber(max_queue=10)
    await hub.follow(a, "chats/a", None, from_start=False)
    await hub.follow(b, "chats/a", None, from_start=False)
    await hub.detach(a, "chats/a")
    assert "chats/a" in broker._subscribed
    await hub.detach(b, "chats/a")
    assert "chats/a" not in broker._subscribed


async def test_heartbeat_timer_beats_idle_subscribers_and_cuts_off_overflowed_ones(broker: MemoryBroker) -> None:
    hub = Hub(broker, heartbeat=0.02, slow_client_grace=0.0)
    idle = Subscriber(max_queue=10)
    await hub.follow(idle, "chats/a", None, from_start=False)
    stuck = Subscriber(max_queue=1)
    await hub.follow(stuck, "chats/a", None, from_start=False)
    stuck.task = asyncio.ensure_future(asyncio.sleep(30))
    await hub.start()
    try:
        assert await asyncio.wait_for(idle.next_batch(), 2.0) == [HEARTBEAT]
        await publish(broker, "chats/a", 2)  # overflows `stuck`, whose task never reads
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(stuck.task, 2.0)
    finally:
        await hub.close()
    assert idle.closed and idle.reason == "shutdown"
