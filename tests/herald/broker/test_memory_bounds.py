"""The memory broker's bounds: topic events and bytes across topics, operations, resources (issue 13, finding 5)."""

from __future__ import annotations

import asyncio

from herald.broker.memory import MemoryBroker
from herald.operations import Status, operation_topic
from herald.protocol import split_cursor
from tests.herald.broker.helpers import command, event


async def test_the_oldest_events_of_all_topics_go_first_and_a_resume_from_before_them_is_a_gap() -> None:
    broker = MemoryBroker(max_events=4)
    a = [await broker.publish("chats/a", event(n)) for n in range(2)]
    b = [await broker.publish("chats/b", event(n)) for n in range(2)]
    assert (broker.kept_events, broker.evicted) == (4, 0)
    b += [await broker.publish("chats/b", event(n)) for n in (2, 3)]  # a's two are the oldest of all
    assert (broker.kept_events, broker.evicted) == (4, 2)
    page = await broker.read("chats/b", None)
    assert ([s.cursor for s in page.events], page.truncated) == (b, False)
    # chats/a lost everything: a resume from its cursors is a gap, not silence
    page = await broker.read("chats/a", a[0])
    assert (page.events, page.truncated, page.reset) == ([], True, True)
    b.append(await broker.publish("chats/b", event(4)))  # evicts b[0]
    page = await broker.read("chats/b", None)
    assert ([s.cursor for s in page.events], page.truncated, page.oldest) == (b[1:], True, b[1])
    page = await broker.read("chats/b", b[0])  # the newest one evicted: nothing after it is missing
    assert ([s.cursor for s in page.events], page.truncated) == (b[1:], False)


async def test_a_topic_emptied_by_eviction_starts_a_new_epoch() -> None:
    broker = MemoryBroker(max_events=2)
    old = await broker.publish("chats/quiet", event(0))
    for n in range(2):
        await broker.publish("chats/busy", event(n))
    assert "chats/quiet" not in broker._topics  # forgotten, not kept empty
    new = await broker.publish("chats/quiet", event(1))
    assert split_cursor(new)[1] != split_cursor(old)[1]
    page = await broker.read("chats/quiet", old)
    assert ([s.cursor for s in page.events], page.truncated, page.reset) == ([new], True, True)


async def test_the_bytes_bound_evicts_as_the_count_does() -> None:
    size = len(event(0).encoded)
    broker = MemoryBroker(max_bytes=3 * size + size // 2)
    cursors = [await broker.publish("chats/big", event(n)) for n in range(5)]
    assert broker.kept_events == 3 and broker.kept_bytes <= 3 * size + size // 2
    assert broker.evicted == 2
    page = await broker.read("chats/big", cursors[0])
    assert ([s.cursor for s in page.events], page.truncated) == (cursors[2:], True)


async def test_a_topics_own_cap_and_expiry_keep_the_global_count_exact() -> None:
    broker = MemoryBroker(history_size=3, history_ttl=0.2, max_events=100)
    for n in range(10):
        await broker.publish("chats/capped", event(n))
    assert broker.kept_events == 3 and broker.evicted == 0  # the topic's own cap is not an eviction
    await asyncio.sleep(0.3)
    await broker.publish("chats/capped", event(10))  # the expired history is replaced
    assert broker.kept_events == 1
    broker.sweep()
    await broker.publish("chats/other", event(0))
    broker.sweep(now=float("inf"))
    assert (broker.kept_events, broker.kept_bytes) == (0, 0)


async def test_stale_references_are_compacted_so_the_fifo_stays_bounded() -> None:
    broker = MemoryBroker(history_size=2, max_events=10)
    for n in range(5000):
        await broker.publish("chats/hot", event(n))
    assert broker.kept_events == 2
    assert len(broker._fifo) <= 2 * broker.kept_events + 1024 + 1


async def test_only_ended_operations_are_forgotten_oldest_first() -> None:
    broker = MemoryBroker(max_operations=3)
    ops = []
    for _ in range(3):
        op, request = command()
        await broker.accept(op, request)
        ops.append(op)
    await broker.transition(ops[1].id, Status.SUCCEEDED)
    await broker.transition(ops[0].id, Status.FAILED, error={"title": "no"})
    op, request = command()
    await broker.accept(op, request)  # four: the first to end (ops[1]) goes
    assert await broker.get_operation(ops[1].id) is None
    assert await broker.get_operation(ops[0].id) is not None
    for _ in range(3):  # only ops[0] has ended: the pending ones stay, over the bound
        extra, request = command()
        await broker.accept(extra, request)
    assert await broker.get_operation(ops[0].id) is None
    assert await broker.get_operation(ops[2].id) is not None
    assert len(broker._operations) == 5
    assert (await broker.read(operation_topic(ops[1].id), None)).events  # its topic is bounded on its own


async def test_idempotency_keys_are_bounded_with_the_operations() -> None:
    broker = MemoryBroker(max_operations=2)
    for n in range(5):
        op, request = command()
        await broker.accept(op, request, idempotency_key=f"k{n}", fingerprint="f")
    assert list(broker._idempotency) == ["k3", "k4"]


async def test_resources_beyond_the_bound_lose_the_least_recently_written() -> None:
    broker = MemoryBroker(max_resources=2)
    await broker.put_resource("/r/1", {"n": 1}, ttl=60)
    await broker.put_resource("/r/2", {"n": 2}, ttl=60)
    await broker.update_resource("/r/1", lambda d: {"n": 11}, ttl=60)  # /r/1 is now the newest
    await broker.put_resource_if_absent("/r/3", {"n": 3}, ttl=60)
    assert await broker.get_resource("/r/2") is None
    assert await broker.get_resource("/r/1") == {"n": 11}
    assert await broker.get_resource("/r/3") == {"n": 3}
