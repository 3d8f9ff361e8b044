"""A topic's followers: one kept bare, two or more in a set; dispatch, gaps and leaving work either way."""

from __future__ import annotations

import asyncio

from herald.broker.memory import MemoryBroker
from herald.hub import Hub, Subscriber
from herald.protocol import Frame


def frame(topic: str, ms: int) -> Frame:
    """A frame at cursor ``ms-0``."""
    return Frame(topic, f"{ms}-0", "T", b"{}")


async def queued(sub: Subscriber) -> list[str]:
    """The cursors queued for ``sub`` right now."""
    batch = await asyncio.wait_for(sub.next_batch(), 1.0)
    return [f.cursor for f in batch if isinstance(f, Frame)]


async def test_one_then_two_then_one_follower_each_get_every_frame_while_they_follow() -> None:
    broker = MemoryBroker()
    hub = Hub(broker)
    first, second = Subscriber(8), Subscriber(8)
    await hub.attach(first, "t")
    hub.dispatch(frame("t", 1))
    await hub.attach(second, "t")
    await hub.attach(second, "t")  # attaching twice changes nothing
    hub.dispatch(frame("t", 2))
    await hub.detach(first, "t")
    hub.dispatch(frame("t", 3))
    assert await queued(first) == ["1-0", "2-0"]
    assert await queued(second) == ["2-0", "3-0"]
    assert hub.frames_dispatched == 4
    hub.gap("t", "9-0")
    assert second.queue and not first.queue
    await hub.detach(second, "t")
    assert hub.topic_count() == 0 and "t" not in broker._subscribed


async def test_a_lone_follower_leaving_unsubscribes_the_broker_and_stray_detaches_are_ignored() -> None:
    broker = MemoryBroker()
    hub = Hub(broker)
    sub, stranger = Subscriber(8), Subscriber(8)
    await hub.attach(sub, "solo")
    assert "solo" in broker._subscribed
    await hub.detach(stranger, "solo")  # not a follower: nothing changes
    hub.dispatch(frame("solo", 1))
    assert await queued(sub) == ["1-0"]
    await hub.leave(sub)
    assert hub.topic_count() == 0 and hub.connections == 0 and "solo" not in broker._subscribed
