"""This process's subscriptions: topic → local connections, each with a bounded queue.

The hub holds one broker-level subscription per topic that at least one local connection
follows, and hands every live frame to each of those connections' queues. Nothing is
encoded here: a :class:`~herald.protocol.Frame` is framed once and shared.

A :class:`Subscriber` is one SSE stream or WebSocket. Its transport coroutine awaits
:meth:`Subscriber.next_batch` and writes what it gets. A transport may also give the
subscriber a ``direct`` write: a live frame that finds the queue empty and the coroutine
parked is then written at once, without waking it (``direct`` returns ``False`` when it
cannot write now, and the frame is queued as usual, so order and the queue bound hold; one that
raises counts as ``False`` and is not used again). When a queue would overflow, the
subscriber is marked overflowed: its queue is dropped (memory stays bounded), the transport
is told to close with ``slow-consumer`` as the reason, and if the transport does not get
to write that within the grace period its task is cancelled. The client reconnects with its
cursor and loses nothing still in the topic's history.

The hub is the broker's sink: nothing a subscriber does raises into the broker's publish, and
one subscriber failing never costs the others a frame (a connection whose ``push`` fails, a
bug, is closed with ``error``; its client resumes from its cursor).

When the broker lost live frames of a topic beyond what its history still holds (a fan-out
connection down for longer than the history lasts), it tells the hub, and every local
subscriber of that topic gets a :class:`Gap` in its queue ahead of the frames still kept.
When the history itself was lost (it has a new epoch), their positions in it are forgotten, so
every frame of the new history passes.

A stream opened with a subscribe token ends when the token expires: the transport registers the
token's ``exp`` with :meth:`Hub.expire_at`, and one sweeping task (:class:`~herald.expiry.ExpiryWheel`,
not a timer per connection) closes it with ``token-expired``; the client resumes with a fresh token.

Resume without gaps or repeats: a subscriber joins the live fan-out *before* the history
is read, holds live frames for that topic while the history is replayed, and then lets
through only frames with a cursor beyond the last one it already has. The history replayed
is bounded by the topic's history size, not by the queue: only live frames count against
``max_queue``, so a client may resume from anywhere in the history without being cut off
at once for the very backlog it asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from herald.broker.base import Broker, HistoryPage
from herald.expiry import ExpiryWheel
from herald.protocol import Cursor, Frame, format_cursor, parse_cursor

log = logging.getLogger("herald.hub")

HEARTBEAT = object()
"""Marker in a batch: time to send a heartbeat."""


@dataclass(frozen=True, slots=True)
class Gap:
    """In a batch: events of ``topic`` after ``cursor`` were lost; ``oldest`` is the oldest still kept."""

    topic: str
    cursor: str | None
    oldest: str | None


class Subscriber:
    """One local connection's queue and positions in the topics it follows."""

    __slots__ = (
        "_backlog",
        "_held",
        "_waiter",
        "closed",
        "direct",
        "dropped",
        "expires_at",
        "heartbeat_due",
        "max_queue",
        "overflowed_at",
        "positions",
        "queue",
        "reason",
        "task",
        "transport",
    )

    direct_failure_logged: ClassVar[bool] = False
    """Whether a direct write raised in this process (a broken one fails for every connection: logged once)."""

    def __init__(self, max_queue: int, transport: str = "sse") -> None:
        self.max_queue = max_queue
        self.transport = transport
        # a list, not a deque: it is only appended to and swapped out whole, and an empty deque costs 600 bytes
        self.queue: list[Frame | Gap | str] = []
        self.positions: dict[str, Cursor | None] = {}
        self._held: dict[str, list[Frame]] | None = None
        self._backlog = 0  # replayed history frames in the queue, which do not count against max_queue
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.dropped = 0  # frames discarded: queue dropped on overflow, or pushed while closing
        self.reason: str | None = None
        self.heartbeat_due = False
        self.expires_at: int | None = None
        """The second (Unix time) its earliest token expires, while it waits in the hub's expiry wheel."""
        self.overflowed_at: float | None = None
        self.task: asyncio.Task[object] | None = None
        self.direct: Callable[[Frame], bool] | None = None
        """Writes a live frame now if it can (see the module docstring); set by the transport."""

    # Called by the hub (on the event loop, never awaiting) ------------------------------
    def push(self, frame: Frame) -> None:
        """Queue a live frame, unless it is a repeat or the connection is closing."""
        self._enqueue(frame, backlog=False)

    def _enqueue(self, frame: Frame, *, backlog: bool) -> None:
        if self.closed:
            self.dropped += 1
            return
        held = self._held
        if held is not None and frame.topic in held:
            held[frame.topic].append(frame)
            return
        key = frame.key
        last = self.positions.get(frame.topic)
        if last is not None and key <= last:
            return
        self.positions[frame.topic] = key
        if not backlog and len(self.queue) - self._backlog >= self.max_queue:
            self.overflow()
            return
        if self.direct is not None and not backlog and not self.queue:
            waiter = self._waiter  # parked and not yet woken: nothing of ours is on its way to the client
            if waiter is not None and not waiter.done():
                try:
                    if self.direct(frame):
                        return
                except Exception:
                    self._direct_failed()  # not written: the frame is queued as if it had said no
        self.queue.append(frame)
        if backlog:
            self._backlog += 1
        self._wake()

    def _direct_failed(self) -> None:
        # A transport's bug must not reach the broker that is publishing (nor the other subscribers
        # of the topic): this connection goes on through its queue, without the direct write.
        self.direct = None
        if not Subscriber.direct_failure_logged:
            Subscriber.direct_failure_logged = True
            log.error("a %s connection's direct write raised; it uses its queue from now on", self.transport,
                      exc_info=True, extra={"event": "hub.direct_failed"})

    def gap(self, topic: str, oldest: str | None, *, epoch: str | None = None, reset: bool = False) -> None:
        """Queue a :class:`Gap` notice for ``topic`` (outside the queue bound, like a control message).

        ``epoch`` is the epoch of the position the loss is measured from; with ``reset`` the history
        itself was lost, so the position is forgotten and the frames of the new history all pass.
        """
        if self.closed or (self._held is not None and topic in self._held):
            return  # a topic being replayed: the subscriber's own history read reports any truncation
        last = self.positions.get(topic)
        self.queue.append(Gap(topic, format_cursor(last, epoch) if last is not None else None, oldest))
        if reset:
            self.positions[topic] = None
        self._wake()

    def control(self, message: str) -> None:
        """Queue a transport-level message (a WebSocket reply), in order with the frames.

        Replies count against ``max_queue`` like live frames: a client that sends pings or commands
        and never reads the answers is cut off as a slow consumer, not buffered for without end.
        """
        if self.closed:
            return
        if len(self.queue) - self._backlog >= self.max_queue:
            self.overflow()
            return
        self.queue.append(message)
        self._wake()

    def overflow(self) -> None:
        """Drop the queue and ask the transport to close as a slow consumer."""
        self.dropped += len(self.queue) + 1  # the queue and the frame that did not fit
        self.queue.clear()
        self._backlog = 0
        self.overflowed_at = time.monotonic()
        self.close("slow-consumer")

    def close(self, reason: str) -> None:
        """Ask the transport to finish with ``reason``."""
        if not self.closed:
            self.closed = True
            self.reason = reason
            self._wake()

    def beat(self) -> None:
        """Ask the transport for a heartbeat."""
        self.heartbeat_due = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Called by the transport coroutine --------------------------------------------------
    def hold(self, topic: str, cursor: str | None) -> None:
        """Start following ``topic`` from ``cursor``; live frames wait until :meth:`replay`."""
        if self._held is None:
            self._held = {}
        self._held[topic] = []
        self.positions[topic] = parse_cursor(cursor) if cursor is not None else None

    def replay(self, topic: str, frames: Iterable[Frame]) -> None:
        """Queue the history read for ``topic``, then the live frames held meanwhile, without repeats."""
        held = self._held.pop(topic, []) if self._held is not None else []
        if not self._held:
            self._held = None
        for frame in frames:
            self._enqueue(frame, backlog=True)
        for frame in held:
            self.push(frame)

    def forget(self, topic: str) -> None:
        """Stop following ``topic``."""
        self.positions.pop(topic, None)
        if self._held is not None:
            self._held.pop(topic, None)
            if not self._held:
                self._held = None

    async def next_batch(self) -> list[Frame | str | object]:
        """Wait for frames or a heartbeat; ``[]`` means closed (see :attr:`reason`)."""
        while not self.queue and not self.heartbeat_due and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.closed and not self.queue:
            return []
        batch: list[Frame | str | object] = list(self.queue)
        self.queue = []
        self._backlog = 0
        if self.heartbeat_due:
            self.heartbeat_due = False
            if not batch:
                batch.append(HEARTBEAT)
        return batch


def _members(subs: Subscriber | set[Subscriber] | None) -> Iterable[Subscriber]:
    if subs is None:
        return ()
    return (subs,) if isinstance(subs, Subscriber) else subs


class Hub:
    """Topic → local subscribers, over one broker subscription per topic."""

    def __init__(self, broker: Broker, *, heartbeat: float = 15.0, slow_client_grace: float = 5.0) -> None:
        self.broker = broker
        self.heartbeat = heartbeat
        self.slow_client_grace = slow_client_grace
        # a topic's one subscriber is kept bare: a set costs ~220 bytes, and most topics have one follower
        # (an operation's stream, a user's own topic)
        self._topics: dict[str, Subscriber | set[Subscriber]] = {}
        self._subscribers: set[Subscriber] = set()
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._timer: asyncio.Task[None] | None = None
        self._expiry = ExpiryWheel()
        self._sweeper: asyncio.Task[None] | None = None
        self.frames_dispatched = 0
        self.frames_dropped = 0
        self.slow_disconnects = 0
        broker.set_sink(self.dispatch)
        broker.set_gap_sink(self.gap)

    @property
    def connections(self) -> int:
        """How many subscribers are attached."""
        return len(self._subscribers)

    def connections_by_transport(self) -> dict[str, int]:
        """How many subscribers are attached, by transport (``sse``, ``ws``, ``wait``)."""
        counts: dict[str, int] = {}
        for sub in self._subscribers:
            counts[sub.transport] = counts.get(sub.transport, 0) + 1
        return counts

    def topic_count(self) -> int:
        """How many topics this process follows."""
        return len(self._topics)

    async def start(self) -> None:
        """Start the single heartbeat timer and the single token-expiry sweep."""
        if self._timer is None:
            self._timer = asyncio.create_task(self._tick(), name="hub-heartbeat")
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="hub-token-expiry")

    async def close(self) -> None:
        """Stop the timers and tell every subscriber to go."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for sub in list(self._subscribers):
            sub.close("shutdown")

    def shutdown(self, reason: str = "shutdown") -> None:
        """Ask every subscriber to close with ``reason`` (they may reconnect elsewhere)."""
        for sub in list(self._subscribers):
            sub.close(reason)

    def gap(self, topic: str, oldest: str | None, *, epoch: str | None = None, reset: bool = False) -> None:
        """Tell every local subscriber of ``topic`` that live events were lost beyond its history."""
        for sub in _members(self._topics.get(topic)):
            sub.gap(topic, oldest, epoch=epoch, reset=reset)

    def dispatch(self, frame: Frame) -> None:
        """Hand a live frame to every local subscriber of its topic."""
        subs = self._topics.get(frame.topic)
        if subs is None:
            return
        if isinstance(subs, Subscriber):
            self.frames_dispatched += 1
            try:
                subs.push(frame)
            except Exception:
                self._push_failed(subs)
            return
        self.frames_dispatched += len(subs)
        for sub in subs:
            try:  # free while nothing raises (3.11): one subscriber's failure must not cost the others the frame
                sub.push(frame)
            except Exception:
                self._push_failed(sub)

    def _push_failed(self, sub: Subscriber) -> None:
        # A bug, not a client's doing. Its queue may now miss the frame, so the connection is ended;
        # the client reconnects with its cursor and replays what it missed. The broker never sees it.
        log.exception("handing a frame to a %s connection failed; closing it", sub.transport,
                      extra={"event": "hub.push_failed"})
        sub.close("error")

    async def attach(self, sub: Subscriber, topic: str) -> None:
        """Add ``sub`` to ``topic``'s local fan-out, subscribing the broker on first use.

        Later subscribers of a topic wait for the first one's broker subscription, so
        nobody reads history before live frames are flowing.
        """
        self._subscribers.add(sub)
        subs = self._topics.get(topic)
        if subs is not None:
            if isinstance(subs, set):
                subs.add(sub)
            elif subs is not sub:
                self._topics[topic] = {subs, sub}
            ready = self._ready.get(topic)
            if ready is not None:
                await asyncio.shield(ready)
            return
        self._topics[topic] = sub
        ready = self._ready[topic] = asyncio.get_running_loop().create_future()
        try:
            await self.broker.subscribe(topic)
        except BaseException as exc:
            self._topics.pop(topic, None)
            ready.set_exception(exc if isinstance(exc, Exception) else ConnectionAbortedError("subscribe cancelled"))
            ready.exception()  # retrieved here, so an unawaited failure is not logged as lost
            raise
        else:
            ready.set_result(None)
        finally:
            self._ready.pop(topic, None)

    async def detach(self, sub: Subscriber, topic: str) -> None:
        """Remove ``sub`` from ``topic``; unsubscribe the broker when nobody local is left."""
        sub.forget(topic)
        subs = self._topics.get(topic)
        if subs is None:
            return
        if isinstance(subs, set):
            subs.discard(sub)
        elif subs is sub:
            subs = self._topics[topic] = set()  # empty, but kept while the first subscribe is in flight
        else:
            return
        if not subs and topic not in self._ready:
            del self._topics[topic]
            try:
                await self.broker.unsubscribe(topic)
            except Exception:  # the broker re-syncs subscriptions on reconnect
                log.warning("unsubscribe from %s failed", topic, exc_info=True)

    def expire_at(self, sub: Subscriber, expires_at: int) -> None:
        """Close ``sub`` with ``token-expired`` at ``expires_at`` (a token's ``exp``; 0: never), unless sooner."""
        if sub in self._subscribers:  # not one that has already left: it would wait in the wheel for nothing
            self._expiry.add(sub, expires_at)

    def join(self, sub: Subscriber) -> None:
        """Count ``sub`` among this process's connections without attaching it to a topic.

        For a subscriber that a router feeds (the Mercure hub's, :mod:`herald.http.mercure`): it gets
        heartbeats, shutdown and token expiry like any other, and :meth:`leave` lets it go.
        """
        self._subscribers.add(sub)

    async def leave(self, sub: Subscriber) -> None:
        """Detach ``sub`` from every topic it follows."""
        for topic in list(sub.positions):
            await self.detach(sub, topic)
        self._subscribers.discard(sub)
        self._expiry.discard(sub)
        self.frames_dropped += sub.dropped
        sub.dropped = 0
        if sub.reason == "slow-consumer":
            self.slow_disconnects += 1

    async def follow(
        self,
        sub: Subscriber,
        topic: str,
        cursor: str | None,
        *,
        from_start: bool,
        announce: Callable[[str | None, HistoryPage | None], None] | None = None,
    ) -> HistoryPage | None:
        """Attach ``sub`` to ``topic`` and queue what it missed.

        With a cursor: everything after it (the whole history kept, when the cursor is of another
        epoch: ``page.reset``). Without: from the oldest kept event when
        ``from_start`` (an operation's stream), else only what is published from now on.
        ``announce(start_cursor, page)`` runs just before the missed frames are queued, so a
        transport can put its own reply ahead of them. Returns the history page read (so
        the caller can report truncation), or ``None`` when starting live.
        """
        sub.hold(topic, cursor)
        try:
            await self.attach(sub, topic)
            page: HistoryPage | None = None
            start = cursor
            if cursor is None and not from_start:
                start = await self.broker.head(topic)
                if start is not None:
                    sub.positions[topic] = parse_cursor(start)
            else:
                page = await self.broker.read(topic, cursor)
                if page.reset:
                    sub.positions[topic] = None  # another history: the cursor's position means nothing in it
        except BaseException:
            await self.detach(sub, topic)
            raise
        if announce is not None:
            announce(start, page)
        sub.replay(topic, (Frame.from_event(topic, s.cursor, s.event) for s in page.events) if page else ())
        return page

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for sub in list(self._subscribers):
                if sub.overflowed_at is not None:
                    if now - sub.overflowed_at > self.slow_client_grace and sub.task is not None:
                        sub.task.cancel()
                elif not sub.closed:
                    sub.beat()

    async def _sweep(self) -> None:
        # One task for every connection's token: wake just past each whole second (a token's exp is
        # whole seconds) and close what expired. An empty wheel costs one wake-up a second.
        while True:
            await asyncio.sleep(1.001 - time.time() % 1.0)
            for sub in self._expiry.expire(time.time()):
                sub.close("token-expired")
