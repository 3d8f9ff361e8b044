"""What only the Redis broker does: one pub/sub connection, TTLs, outages, several processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from herald.broker.base import BrokerUnavailable
from herald.broker.redis import RedisBroker
from herald.operations import Status, new_operation_id, operation_topic
from herald.protocol import Frame, split_cursor
from tests.herald.broker.helpers import REQUEST, command, event, eventually
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., RedisBroker]]:
    """Build RedisBrokers (each one a "process"); all are closed after the test."""
    made: list[RedisBroker] = []

    def build(url: str, **options: Any) -> RedisBroker:
        made.append(RedisBroker(url, **{"history_size": 50, "visibility_timeout": 0.3, **options}))
        return made[-1]

    yield build
    for broker in made:
        await broker.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A Redis of this test alone, with an append-only file, that the test may stop and restart."""
    server = RedisServer(appendonly=True)
    server.start()
    yield server
    server.cleanup()


def pubsub_clients(server: RedisServer) -> list[dict[str, str]]:
    """The CLIENT LIST entries of connections that hold subscriptions."""
    with server.client() as client:
        return [c for c in client.client_list() if int(c["sub"]) > 0 or "P" in c["flags"]]


async def test_one_pubsub_connection_however_many_topics(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    await broker.start()
    topics = [f"chats/room{n}" for n in range(20)] + [operation_topic(new_operation_id())]
    for topic in topics:
        await broker.subscribe(topic)
    [holder] = pubsub_clients(redis_server)
    assert int(holder["sub"]) == len(topics)
    with redis_server.client() as client:
        assert all(n == 1 for _, n in client.pubsub_numsub(*(f"herald:topic:{{{t}}}" for t in topics)))
        for topic in topics:
            await broker.unsubscribe(topic)
        await eventually(lambda: client.pubsub_channels("herald:*") == [])
    assert pubsub_clients(redis_server) == []


async def test_every_key_but_the_request_queue_has_a_ttl(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url, operation_ttl=600, history_ttl=300)
    op, request = command()
    await broker.accept(op, request, idempotency_key="owner:k", fingerprint="f")
    await broker.transition(op.id, Status.RUNNING)
    await broker.publish("chats/ttl", event(1))
    await broker.put_resource("/chats/ttl/messages/m1", {"id": "m1"}, ttl=120)
    with redis_server.client() as client:
        ttls = {key.decode(): client.ttl(key) for key in client.keys("herald:*")}
    assert ttls.keys() == {
        f"herald:op:{{operations/{op.id}}}",
        "herald:idem:{owner:k}",
        f"herald:topic:{{operations/{op.id}}}",
        f"herald:epoch:{{operations/{op.id}}}",
        "herald:topic:{chats/ttl}",
        "herald:epoch:{chats/ttl}",
        "herald:res:{/chats/ttl/messages/m1}",
        f"herald:req:{{{REQUEST}}}",
    }
    assert 590 < ttls[f"herald:op:{{operations/{op.id}}}"] <= 600
    assert 590 < ttls["herald:idem:{owner:k}"] <= 600
    assert 590 < ttls[f"herald:topic:{{operations/{op.id}}}"] <= 600
    assert 590 < ttls[f"herald:epoch:{{operations/{op.id}}}"] <= 600
    assert 290 < ttls["herald:topic:{chats/ttl}"] <= 300
    assert 290 < ttls["herald:epoch:{chats/ttl}"] <= 300
    assert 110 < ttls["herald:res:{/chats/ttl/messages/m1}"] <= 120
    assert ttls[f"herald:req:{{{REQUEST}}}"] == -1  # work waits for a worker however long it takes


async def test_accept_with_redis_down_fails_fast_and_writes_nothing(
    own_server: RedisServer, make: Callable[..., RedisBroker]
) -> None:
    broker = make(own_server.url())
    await broker.start()
    kept_op, kept_request = command()
    await broker.accept(kept_op, kept_request)
    own_server.stop()
    lost_op, lost_request = command()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.accept(lost_op, lost_request, idempotency_key="k", fingerprint="f")
    assert time.monotonic() - started < 3
    assert not await broker.ping()
    with pytest.raises(BrokerUnavailable):
        await broker.get_operation(kept_op.id)
    own_server.restart()
    assert await broker.ping()
    assert await broker.get_operation(kept_op.id) == kept_op  # the append-only file kept it
    assert await broker.get_operation(lost_op.id) is None
    [delivery] = await broker.consume([REQUEST], "w", count=10, block=0.2)
    assert delivery.event.id == kept_request.id
    # the restart emptied the script cache: accept loads its script again
    again_op, again_request = command()
    assert (await broker.accept(again_op, again_request, idempotency_key="k", fingerprint="f")).created


async def test_subscriber_gets_what_was_published_while_it_was_cut_off_then_live_events(
    own_server: RedisServer, make: Callable[..., RedisBroker]
) -> None:
    listener = make(own_server.url(), history_size=100_000)
    publisher = make(own_server.url(), history_size=100_000)
    frames: list[Frame] = []
    listener.set_sink(frames.append)
    await listener.subscribe("chats/outage")
    cursors = [await publisher.publish("chats/outage", event(0))]
    await eventually(lambda: len(frames) == 1)

    own_server.kill()
    # Back up, but refusing the listener (no password) until we say so: what is published now
    # can only reach it through the history, after it reconnects.
    own_server.start("--requirepass", "s3cret")
    during = make(own_server.url(password="s3cret"), history_size=100_000)
    cursors += [await during.publish("chats/outage", event(n)) for n in (1, 2)]
    await asyncio.sleep(0.3)
    assert len(frames) == 1
    with own_server.client(password="s3cret") as client:
        client.config_set("requirepass", "")

    # Keep publishing while the listener reconnects, so live frames overlap its history read.
    deadline = time.monotonic() + 10
    while len(frames) < len(cursors) - 20 or len(frames) < 50:
        assert time.monotonic() < deadline, "the listener did not catch up after the restart"
        cursors.append(await publisher.publish("chats/outage", event(len(cursors))))
    await eventually(lambda: len(frames) >= len(cursors))
    await asyncio.sleep(0.2)  # room for a duplicate to show up
    assert [f.cursor for f in frames] == cursors
    history = await publisher.read("chats/outage", None, limit=len(cursors))
    assert [f.encoded for f in frames] == [s.event.encoded for s in history.events]


async def test_a_redis_that_comes_back_empty_is_reported_as_a_lost_history_then_the_new_one_follows(
    make: Callable[..., RedisBroker]
) -> None:
    server = RedisServer()  # no persistence: a crash loses every history, as a failover to an empty replica does
    server.start()
    try:
        listener = make(server.url())
        frames: list[Frame] = []
        gaps: list[tuple[str, str | None, str | None, bool]] = []
        listener.set_sink(frames.append)
        listener.set_gap_sink(lambda topic, oldest, *, epoch=None, reset=False: gaps.append(
            (topic, oldest, epoch, reset)))
        await listener.subscribe("chats/amnesia")
        publisher = make(server.url())
        before = [await publisher.publish("chats/amnesia", event(n)) for n in range(2)]
        await eventually(lambda: len(frames) == 2)

        server.kill()
        server.start("--requirepass", "s3cret")  # empty, and refusing the listener until we say so
        during = make(server.url(password="s3cret"))
        after = [await during.publish("chats/amnesia", event(n)) for n in (2, 3)]
        with server.client(password="s3cret") as client:
            client.config_set("requirepass", "")
        await eventually(lambda: len(frames) == 4, timeout=10)
    finally:
        server.cleanup()
    old_epoch, new_epoch = split_cursor(before[0])[1], split_cursor(after[0])[1]
    assert old_epoch != new_epoch
    assert gaps == [("chats/amnesia", after[0], old_epoch, True)]
    assert [f.cursor for f in frames] == before + after


async def test_a_stream_deleted_alone_or_an_epoch_key_evicted_alone_starts_a_new_epoch(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    seen = {split_cursor(await broker.publish("chats/del", event(0)))[1]}
    for key in ("herald:topic:{chats/del}", "herald:epoch:{chats/del}"):
        old = await broker.publish("chats/del", event(1))
        with redis_server.client() as client:
            client.delete(key)
        new = await broker.publish("chats/del", event(2))
        epoch = split_cursor(new)[1]
        assert epoch not in seen, key
        seen.add(epoch)
        page = await broker.read("chats/del", old)
        assert (page.truncated, page.reset, page.oldest) == (True, True, page.events[0].cursor), key
        assert page.events[-1].cursor == new
        assert all(split_cursor(s.cursor)[1] == epoch for s in page.events)


async def test_the_epoch_is_made_in_the_publish_script_itself(redis_url: str, make: Callable[..., RedisBroker]) -> None:
    broker = make(redis_url)
    command_ = broker.publish_command("chats/one", "T", b"{}")
    # one EVALSHA on the stream and its epoch key, which share the topic's hash tag (one Cluster slot)
    assert command_[:5] == ("EVALSHA", broker._publish_script.sha, 2, "herald:topic:{chats/one}",
                            "herald:epoch:{chats/one}")
    first = await broker.publish("chats/one", event(0))
    cursor = (await broker._redis.execute_command(*command_)).decode()
    epoch = split_cursor(cursor)[1]
    assert epoch is not None and len(epoch) <= 6 and epoch == split_cursor(first)[1]
    assert await broker.head("chats/one") == cursor


async def test_a_pubsub_connection_that_stops_answering_is_replaced(
    own_server: RedisServer, make: Callable[..., RedisBroker]
) -> None:
    # SIGSTOP: the socket stays open but nothing answers, as with a hung server or a dead peer
    # behind a NAT. Only the watchdog's PING can tell; without it the old connection would simply
    # resume after SIGCONT and no reconnection would happen.
    listener = make(own_server.url(), health_interval=0.2, socket_timeout=1.0)
    frames: list[Frame] = []
    listener.set_sink(frames.append)
    await listener.subscribe("chats/hung")
    assert own_server.process is not None
    os.kill(own_server.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(1.0)  # well past two health intervals
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)
    await eventually(lambda: listener.reconnects >= 1)
    await eventually(lambda: "chats/hung" in listener._confirmed)
    publisher = make(own_server.url())
    cursor = await publisher.publish("chats/hung", event(1))
    await eventually(lambda: len(frames) == 1)
    assert frames[0].cursor == cursor
    assert len(pubsub_clients(own_server)) == 1  # the stalled connection was closed, not left behind


async def test_publish_on_one_instance_reaches_the_sink_of_another(
    redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    a, b = make(redis_url), make(redis_url)
    frames_a: list[Frame] = []
    frames_b: list[Frame] = []
    a.set_sink(frames_a.append)
    b.set_sink(frames_b.append)
    await b.subscribe("chats/shared")
    sent = event(1)
    cursor = await a.publish("chats/shared", sent)
    await eventually(lambda: len(frames_b) == 1)
    assert (frames_b[0].cursor, frames_b[0].encoded) == (cursor, sent.encoded)
    assert frames_a == []  # a did not subscribe


async def test_consumers_on_two_instances_share_the_work_without_duplicates(
    redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    a, b = make(redis_url), make(redis_url)
    queued = set()
    for _ in range(20):
        op, request = command()
        await a.accept(op, request)
        queued.add(request.id)
    got: dict[str, list[str]] = {"a": [], "b": []}

    async def work(name: str, broker: RedisBroker) -> None:
        deadline = time.monotonic() + 5
        while sum(map(len, got.values())) < len(queued) and time.monotonic() < deadline:
            for delivery in await broker.consume([REQUEST], name, block=0.2):
                got[name].append(delivery.event.id)
                await asyncio.sleep(0.005)  # the work itself
                await broker.ack(delivery)

    await asyncio.gather(work("a", a), work("b", b))
    assert sorted(got["a"] + got["b"]) == sorted(queued)
    assert got["a"] and got["b"]


async def test_reclaim_skips_entries_deleted_while_pending(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    for _ in range(2):
        await broker.accept(*command())
    first, second = await broker.consume([REQUEST], "w1", count=2, block=1)
    with redis_server.client() as client:
        client.xdel(f"herald:req:{{{REQUEST}}}", first.delivery_id.split("|")[1])
    await asyncio.sleep(0.4)  # past the visibility timeout
    [again] = await broker.consume([REQUEST], "w2", count=5, block=0)
    assert (again.event.id, again.deliveries) == (second.event.id, 2)


async def test_consume_makes_the_group_again_when_it_vanished(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    assert await broker.consume([REQUEST], "w", block=0) == []  # the group exists now
    with redis_server.client() as client:
        client.flushall()  # as a Redis without persistence after a restart
    op, request = command()
    await broker.accept(op, request)
    [delivery] = await broker.consume([REQUEST], "w", block=1)
    assert delivery.event.id == request.id


async def test_an_unreadable_request_entry_is_dropped_not_handed_out(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    with redis_server.client() as client:
        client.xadd(f"herald:req:{{{REQUEST}}}", {"event": b"{not json"})
    op, request = command()
    await broker.accept(op, request)
    deliveries = await broker.consume([REQUEST], "w", count=5, block=0.5)
    assert [d.event.id for d in deliveries] == [request.id]
    with redis_server.client() as client:
        assert client.xlen(f"herald:req:{{{REQUEST}}}") == 1  # only the good one, until it is acked


async def test_a_late_ack_from_a_consumer_that_timed_out_ends_the_entry(
    redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    await broker.accept(*command())
    [slow] = await broker.consume([REQUEST], "slow", block=1)
    await asyncio.sleep(0.4)
    [fast] = await broker.consume([REQUEST], "fast", block=0)
    assert fast.deliveries == 2
    await broker.ack(slow)
    await broker.ack(fast)
    assert await broker.consume([REQUEST], "any", block=0.5) == []


async def test_subscribe_fails_fast_when_redis_is_down(
    own_server: RedisServer, make: Callable[..., RedisBroker]
) -> None:
    broker = make(own_server.url(), socket_timeout=1.0)
    await broker.start()
    own_server.stop()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("chats/nowhere")
    assert time.monotonic() - started < 3
    own_server.restart()
    frames: list[Frame] = []
    broker.set_sink(frames.append)
    await broker.subscribe("chats/nowhere")
    cursor = await broker.publish("chats/nowhere", event(1))
    await eventually(lambda: [f.cursor for f in frames] == [cursor])


async def test_reclaim_runs_when_due_not_on_every_consume(
    redis_url: str, make: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make(redis_url, visibility_timeout=3600)
    broker._poll = 3600.0  # the time-based reclaim never falls due during the test: only the events below count
    reclaims = 0
    reclaim = broker._reclaim

    async def counted(*args: Any) -> Any:
        nonlocal reclaims
        reclaims += 1
        return await reclaim(*args)

    monkeypatch.setattr(broker, "_reclaim", counted)
    for _ in range(4):
        await broker.accept(*command())
    taken = [d for _ in range(3) for d in await broker.consume([REQUEST], "w", block=0)]
    assert len(taken) == 3
    assert reclaims == 1, "only the first consume reclaims while new work keeps coming"
    await broker.release(taken[0])
    [again] = await broker.consume([REQUEST], "w", block=0)
    assert (again.event.id, again.deliveries, reclaims) == (taken[0].event.id, 2, 2)  # a release makes it due
    [fourth] = await broker.consume([REQUEST], "w", block=0)
    assert (fourth.deliveries, reclaims) == (1, 3)  # a reclaim that filled count looks again next time
    assert await broker.consume([REQUEST], "w", block=0) == []
    assert reclaims == 3
    assert await broker.consume([REQUEST], "w", block=0) == []
    assert reclaims == 4, "after XREADGROUP found nothing, the next consume reclaims"


async def test_a_consumer_that_keeps_finding_new_work_still_takes_over_a_dead_consumers_job(
    redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)  # visibility timeout 0.3 s
    op, request = command()
    await broker.accept(op, request)
    await broker.consume([REQUEST], "dead", block=1)  # taken, never acknowledged
    taken_over = None
    deadline = time.monotonic() + 10
    for _ in range(1000):
        if taken_over is not None or time.monotonic() > deadline:
            break
        await broker.accept(*command())  # there is always new work for XREADGROUP
        for delivery in await broker.consume([REQUEST], "busy", block=0):
            if delivery.event.id == request.id:
                taken_over = delivery
            await broker.ack(delivery)
        await asyncio.sleep(0.01)
    assert taken_over is not None, "the abandoned job was never reclaimed"
    assert taken_over.deliveries == 2


async def test_ending_an_operation_with_its_events_and_ack_is_one_command_with_publishs_ttls(
    redis_server: RedisServer, redis_url: str, make: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make(redis_url, operation_ttl=600, history_ttl=300)
    op, request = command()
    await broker.accept(op, request)
    [delivery] = await broker.consume([REQUEST], "w", block=1)
    running = await broker.transition(op.id, Status.RUNNING)
    sent: list[str] = []
    execute = broker._pipe.execute

    async def counted(*args: Any) -> Any:
        sent.append(str(args[0]))
        return await execute(*args)

    monkeypatch.setattr(broker._pipe, "execute", counted)
    topic = operation_topic(op.id)
    await broker.transition(op.id, Status.SUCCEEDED, current=running,
                            events=[(topic, event(1)), ("chats/ttl", event(2))], ack=delivery)
    assert sent == ["EVALSHA"]  # the events, the move, its status event and the ack: one round trip
    with redis_server.client() as client:
        assert 290_000 < client.pttl("herald:topic:{chats/ttl}") <= 300_000  # as publish(): history_ttl
        assert 590_000 < client.pttl(f"herald:topic:{{{topic}}}") <= 600_000  # operations/*: operation_ttl
        assert client.xlen(f"herald:req:{{{REQUEST}}}") == 0  # XDEL
        assert client.xpending(f"herald:req:{{{REQUEST}}}", "herald-workers")["pending"] == 0  # XACK


async def test_ending_an_operation_with_events_loads_the_script_into_a_redis_that_lost_it(
    redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    broker = make(redis_url)
    op, request = command()
    await broker.accept(op, request)
    [delivery] = await broker.consume([REQUEST], "w", block=1)
    await broker._redis.script_flush()  # as after a restart without persistence
    await broker.transition(op.id, Status.SUCCEEDED, events=[("chats/flushed", event(1))], ack=delivery)
    assert [s.event.data for s in (await broker.read("chats/flushed", None)).events] == [{"n": 1}]
    assert await broker.consume([REQUEST], "w2", block=0.7) == []


async def test_updates_of_one_resource_from_several_processes_lose_none(
    redis_url: str, make: Callable[..., RedisBroker]
) -> None:
    """Writers in one process take turns; across processes WATCH/MULTI conflicts are retried, none lost."""
    brokers = [make(redis_url) for _ in range(4)]
    for broker in brokers:
        await broker.start()
    path = "/things/contended"
    await brokers[0].put_resource(path, {"names": []}, ttl=60)
    conflicts = 0

    def add(name: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
        def change(document: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal conflicts
            conflicts += 1  # called once per try: more calls than names means WATCH caught a conflict
            return {"names": [*document["names"], name]}
        return change

    names = [f"b{b}-{i:02d}" for b in range(4) for i in range(10)]
    await asyncio.gather(*(brokers[int(n[1])].update_resource(path, add(n), ttl=60) for n in names))
    stored = await brokers[1].get_resource(path)
    assert stored is not None and sorted(stored["names"]) == sorted(names)
    assert conflicts > len(names)  # the cross-process path was exercised, not only the per-process lock


async def test_a_first_delivery_carries_the_operation_as_accepted_and_a_move_from_a_stale_copy_reads_it_again(
    redis_url: str, make: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make(redis_url)
    op, request = command()
    await broker.accept(op, request)
    [delivery] = await broker.consume([REQUEST], "w", block=1)
    assert delivery.operation == op  # what the worker moves to running without a read
    await broker.request_cancel(op.id)  # the client cancels after the accept: the carried copy is stale now
    reads: list[str] = []
    get_operation = broker.get_operation

    async def counting(operation_id: str) -> Any:
        reads.append(operation_id)
        return await get_operation(operation_id)

    monkeypatch.setattr(broker, "get_operation", counting)
    running = await broker.transition(op.id, Status.RUNNING, current=delivery.operation)
    assert reads == [op.id]  # the script refused the stale version; the move read the operation and applied
    assert running.cancel_requested and running.version == 3 and running.attempts == 1
    await broker.release(delivery)
    [again] = await broker.consume([REQUEST], "w", block=1)
    assert again.deliveries == 2 and again.operation is None  # a redelivery reads the operation as it is now
