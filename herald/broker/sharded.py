"""The live fan-out of the cluster broker: sharded pub/sub, one connection per master, topics moved with their slot.

On a Redis Cluster a topic's events are ``SPUBLISH``-ed by the append script on the master that
serves the topic's slot (the channel is named like the topic's stream, so it shares its slot).
A :class:`ShardedFanout` holds one :class:`ShardReader` per master that serves a topic this
process follows; each reader has one connection on which it ``SSUBSCRIBE``-s only those topics.

A topic leaves its master when its slot does, and the reader hears of it in one of three ways:
the server ends the subscription itself (an ``sunsubscribe`` nobody asked for: the slot was
migrated away), a ``SSUBSCRIBE`` is answered ``MOVED``, or the connection breaks (the master
died; its replica is promoted after ``cluster-node-timeout``). Then the slot map is read again
and the topic is subscribed on whoever serves it now. Whenever a topic's subscription is
confirmed again after it was interrupted, what the topic got meanwhile is refilled from its
history exactly as after a Redis restart (``RedisBroker._refill``: after the last cursor handed
over, the gap reported first when the history lost some): its live frames are held back until
the refill is done, so they come after the history's and each frame is handed over once, in
order (the broker drops a cursor it has handed over already).

A reader whose connection breaks reconnects with a backoff of 0.1 s to 1 s, reading the slot map
before each attempt; a watchdog PINGs a quiet connection, as the RedisBroker's reader does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, MovedError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from herald.broker.base import BrokerUnavailable
from herald.broker.slots import key_slot
from herald.protocol import Frame, is_terminal_type

if TYPE_CHECKING:
    from herald.broker.cluster import ClusterBroker

log = logging.getLogger("herald.broker.cluster")

_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 1.0
_HELD_MAX = 100_000  # live frames held back for one topic while it refills; past that, the refill reads them too
_PREFIX = "herald:topic:{"


def channel(topic: str) -> str:
    """A topic's sharded channel: its stream's key, so both are in one slot."""
    return f"{_PREFIX}{topic}}}"


def _topic(raw: Any) -> str:
    name = raw.decode() if isinstance(raw, bytes) else str(raw)
    return name[len(_PREFIX):-1]


class ShardedFanout:
    """One :class:`ShardReader` per master serving a followed topic, and the topics' moves between them."""

    def __init__(self, broker: ClusterBroker) -> None:
        self._broker = broker
        self._readers: dict[str, ShardReader] = {}
        self._home: dict[str, ShardReader] = {}
        self._held: dict[str, list[Frame]] = {}  # topics being refilled, and their live frames held back meanwhile
        self._again: set[str] = set()  # refills to run once more (the topic was interrupted during its refill)
        self._refills: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    @property
    def connections(self) -> int:
        """Pub/sub connections open now (one per master that serves a followed topic)."""
        return sum(1 for r in self._readers.values() if r.conn is not None)

    async def _reader_for(self, topic: str) -> ShardReader:
        node = await self._broker.calls.node(key_slot(channel(topic)))
        reader = self._readers.get(node.name)
        if reader is None or reader.stopped:
            reader = self._readers[node.name] = ShardReader(self, node)
        return reader

    async def subscribe(self, topic: str) -> None:
        """Subscribe ``topic`` on the master that serves it (confirmed later, through the broker's waiter)."""
        old = self._home.get(topic)
        reader = await self._reader_for(topic)
        if old is not None and old is not reader:
            await old.remove(topic)
        self._home[topic] = reader
        await reader.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop following ``topic``."""
        reader = self._home.pop(topic, None)
        self._held.pop(topic, None)
        self._again.discard(topic)
        if reader is not None:
            await reader.remove(topic)

    def interrupted(self, topic: str) -> None:
        """``topic``'s subscription ended without being asked to: hold its live frames until it is refilled."""
        self._broker._confirmed.discard(topic)
        if topic in self._broker._wanted and (topic in self._broker._delivered or topic in self._broker._floor):
            self._held.setdefault(topic, [])
            if topic in self._refills:
                self._again.add(topic)

    def moved(self, topics: list[str]) -> None:
        """These topics' slots are served elsewhere now: subscribe them where they are (in the background)."""
        for topic in topics:
            self.interrupted(topic)
        self._spawn(self._rehome(topics))

    async def _rehome(self, topics: list[str], delay: float = _BACKOFF_MIN) -> None:
        await self._broker.calls.refresh()
        failed: list[str] = []
        for topic in topics:
            if topic not in self._broker._wanted:
                continue
            try:
                await self.subscribe(topic)
            except (RedisError, OSError, BrokerUnavailable) as exc:
                # no slot map to be had right now (the cluster unreachable): try again, less and less often
                log.log(logging.WARNING if delay == _BACKOFF_MIN else logging.DEBUG,
                        "could not subscribe %s where its slot moved (%s); trying again", topic, exc)
                failed.append(topic)
        if failed:
            await asyncio.sleep(delay)
            self._spawn(self._rehome(failed, min(delay * 2, _BACKOFF_MAX)))

    async def rehome_from(self, reader: ShardReader) -> None:
        """After ``reader``'s connection broke: move each of its topics whose slot another master serves now."""
        await self._broker.calls.refresh()
        for topic in list(reader.topics):
            try:
                elsewhere = await self._reader_for(topic)
            except (RedisError, OSError):
                continue  # no map of the slots yet: the reader tries its node again
            if elsewhere is not reader:
                reader.topics.discard(topic)
                self._home[topic] = elsewhere
                await elsewhere.add(topic)
        if not reader.topics:
            reader.stop()
            if self._readers.get(reader.name) is reader:
                del self._readers[reader.name]

    def confirmed(self, reader: ShardReader, topic: str) -> None:
        """``SSUBSCRIBE`` of ``topic`` confirmed on ``reader``: tell the waiter, and refill if it was interrupted."""
        if self._home.get(topic) is not reader:
            return  # moved on meanwhile
        self._broker._confirm(topic)
        if topic in self._held:
            if topic in self._refills:
                self._again.add(topic)
            else:
                self._refills[topic] = self._spawn(self._refill(topic))

    def live(self, frame: Frame) -> None:
        """A frame off a pub/sub connection: to the broker, unless its topic is being refilled."""
        held = self._held.get(frame.topic)
        if held is None:
            self._broker._hand(frame)
        elif len(held) < _HELD_MAX:
            held.append(frame)
        else:
            held.clear()  # the history has them: the refill reads them with the rest
            self._again.add(frame.topic)

    async def _refill(self, topic: str) -> None:
        delay = _BACKOFF_MIN
        try:
            while topic in self._held and topic in self._broker._wanted:
                self._again.discard(topic)
                try:
                    await self._broker._refill(topic)
                except BrokerUnavailable as exc:
                    log.debug("refill of %s failed (%s); trying again", topic, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                if topic not in self._again:
                    break
            for frame in self._held.pop(topic, []):
                self._broker._hand(frame)  # the refill handed these over already if the history had them
        finally:
            self._refills.pop(topic, None)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop every reader and background task."""
        self.closed = True
        for reader in self._readers.values():
            reader.stop()
        tasks = [*self._tasks, *(r.task for r in self._readers.values() if r.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._readers.clear()


class ShardReader:
    """One master's sharded pub/sub connection, subscribed to the followed topics that master serves."""

    def __init__(self, fanout: ShardedFanout, node: ClusterNode) -> None:
        self.fanout = fanout
        self.node = node
        self.name = node.name
        self.topics: set[str] = set()
        self.conn: AbstractConnection | None = None
        self.stopped = False
        self._lock = asyncio.Lock()
        self._leaving: Counter[str] = Counter()  # SUNSUBSCRIBEs sent whose confirmation has not come yet
        self._received = 0
        self.task: asyncio.Task[None] | None = asyncio.ensure_future(self._run())

    async def add(self, topic: str) -> None:
        """Follow ``topic`` here: ``SSUBSCRIBE`` now if connected, else when the connection is (re)made."""
        self.topics.add(topic)
        await self._send("SSUBSCRIBE", topic)

    async def remove(self, topic: str) -> None:
        """Stop following ``topic`` here."""
        if topic not in self.topics:
            return
        self.topics.discard(topic)
        self.fanout._broker._confirmed.discard(topic)
        if self.conn is not None:
            self._leaving[topic] += 1
        await self._send("SUNSUBSCRIBE", topic)

    def stop(self) -> None:
        """Stop reading; the task ends and closes the connection."""
        self.stopped = True
        if self.task is not None:
            self.task.cancel()

    async def _send(self, command: str, topic: str) -> None:
        async with self._lock:
            conn = self.conn
            if conn is None or not conn.is_connected:
                return  # the reader subscribes every topic it holds when it connects
            try:
                await conn.send_command(command, channel(topic))
            except (RedisError, OSError):
                pass  # the reader sees the broken connection too, and reconnects

    async def _run(self) -> None:
        delay = _BACKOFF_MIN
        opened = False
        broker = self.fanout._broker
        while not self.stopped:
            conn: AbstractConnection | None = None
            try:
                conn = self.node.connection_class(**self.node.connection_kwargs)
                await conn.connect()
                async with self._lock:
                    topics = sorted(self.topics)
                    for topic in topics:
                        self.fanout.interrupted(topic)  # a topic that had a position is refilled once confirmed
                    if topics:  # one command per topic: SSUBSCRIBE takes channels of one slot only
                        await conn.send_packed_command(conn.pack_commands([("SSUBSCRIBE", channel(t))
                                                                          for t in topics]))
                    self.conn = conn
                    self._leaving.clear()
                broker.reconnects += opened  # the first connection is not a reconnection
                opened = True
                delay = _BACKOFF_MIN
                await self._pump(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke the connection, the cure is a new one (maybe elsewhere)
                log.log(logging.WARNING if delay == _BACKOFF_MIN else logging.DEBUG,
                        "sharded pub/sub connection to %s lost (%s); reconnecting in %.1fs", self.name, exc, delay)
            finally:
                self.conn = None
                for topic in self.topics:
                    self.fanout.interrupted(topic)  # wherever it is confirmed next, it is refilled first
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
            if self.stopped or self.fanout.closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)
            await self.fanout.rehome_from(self)  # a failover moves this node's topics to the promoted replica

    async def _pump(self, conn: AbstractConnection) -> None:
        stalled = asyncio.Event()
        watchdog = asyncio.ensure_future(self._watch(conn, stalled))
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf)
                except AskError as exc:  # MOVED (or ASK, mid-migration) to an SSUBSCRIBE: that slot is elsewhere
                    if isinstance(exc, MovedError):
                        await self.fanout._broker.calls.moved(exc)
                    else:
                        await asyncio.sleep(_BACKOFF_MIN)  # the slot is being migrated: it settles shortly
                    gone = [t for t in self.topics if key_slot(channel(t)) == exc.slot_id]
                    self.topics.difference_update(gone)
                    self.fanout.moved(gone)
                    continue
                self._received += 1
                self._on_reply(reply)
        except (RedisError, OSError) as exc:
            if stalled.is_set():
                raise RedisConnectionError("the sharded pub/sub connection stopped answering") from exc
            raise
        finally:
            watchdog.cancel()

    async def _watch(self, conn: AbstractConnection, stalled: asyncio.Event) -> None:
        """PING after ``health_interval`` without a reply; close the connection if the next interval is silent too."""
        interval = self.fanout._broker._health_interval
        seen, pinged = self._received, False
        while True:
            await asyncio.sleep(interval)
            if self._received != seen:
                seen, pinged = self._received, False
                continue
            if pinged:
                stalled.set()
                await conn.disconnect(nowait=True)
                return
            try:
                async with self._lock:
                    await conn.send_command("PING")
            except (RedisError, OSError):
                return
            pinged = True

    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG
        kind, topic, data = reply[0], _topic(reply[1]), reply[2]
        if kind == b"smessage":
            cursor, raw_type, encoded = data.split(b"\n", 2)
            type_ = raw_type.decode()
            self.fanout.live(Frame(topic, cursor.decode(), type_, encoded, terminal=is_terminal_type(type_)))
        elif kind == b"ssubscribe":
            if topic in self.topics:
                self.fanout.confirmed(self, topic)
        elif kind == b"sunsubscribe":
            if self._leaving[topic] > 0:
                self._leaving[topic] -= 1  # the confirmation of one this reader sent
            elif topic in self.topics:  # the server ended it: the slot moved to another master
                self.topics.discard(topic)
                self.fanout.moved([topic])
