"""MemoryBroker: the embedded default, everything inside one process.

The same contract as the Redis broker, kept in dicts and deques: used when
``REDIS_URL`` is unset, and by the test suite as the reference implementation.

Bounded, so that no client can fill the process's memory (besides the TTLs, which take a day):

* topic histories hold at most ``max_events`` events and ``max_bytes`` bytes of encoded events
  across all topics. Beyond either, the oldest events of all topics go first (a global FIFO of
  references, in publish order); a resume from before one of them gets a gap as any truncated
  history does, and :attr:`Broker.evicted` counts them. A topic left empty is forgotten, so its
  next event starts a new epoch (and a cursor of the old one gets a gap from there);
* ``max_operations`` operations (and as many idempotency keys): beyond, the oldest *ended*
  operations are forgotten first, never a pending or running one;
* ``max_resources`` resource documents: beyond, the least recently written goes first.

Each topic's history has an epoch (random, made with the history), so a cursor from a history that
expired, was evicted or lived in an earlier process is told apart (see :mod:`herald.protocol`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from herald.broker.base import (
    Accepted,
    Broker,
    Delivery,
    HistoryPage,
    IdempotencyConflict,
    OperationNotFound,
    StoredEvent,
)
from herald.events import Event
from herald.operations import IllegalTransition, Operation, Status, operation_topic, status_event, transition
from herald.operations import request_cancel as cancel_flag
from herald.protocol import Cursor, Frame, format_cursor, format_epoch, history_lost, split_cursor

log = logging.getLogger("herald.broker.memory")

MAX_EVENTS = 100_000
"""Default bound on the events kept in all topic histories together."""
MAX_BYTES = 64 * 1024 * 1024
"""Default bound on the bytes of encoded events kept in all topic histories together."""
MAX_OPERATIONS = 100_000
"""Default bound on the operations kept (ended ones are forgotten first)."""
MAX_RESOURCES = 100_000
"""Default bound on the resource documents kept."""


def _new_epoch() -> str:
    # Random, not time-based: a topic may be dropped and made again within the same millisecond, and a
    # restarted process must not hand out an epoch its predecessor used. Not a secret, so not `secrets`.
    return format_epoch(random.getrandbits(31))


@dataclass(slots=True)
class _Topic:
    events: deque[tuple[Cursor, StoredEvent]]
    epoch: str = field(default_factory=_new_epoch)
    last: Cursor = (0, 0)
    dropped: Cursor | None = None  # newest cursor evicted by the cap
    expires_at: float = 0.0


@dataclass(slots=True)
class _Queue:
    ready: deque[tuple[str, Event, int]] = field(default_factory=deque)
    inflight: dict[str, tuple[Event, int, float]] = field(default_factory=dict)


class MemoryBroker(Broker):
    """A broker whose state lives in this process only."""

    def __init__(
        self,
        *,
        history_size: int = 1000,
        operation_ttl: float = 86400,
        history_ttl: float = 86400,
        visibility_timeout: float = 30.0,
        # Limits
        max_events: int = MAX_EVENTS,
        max_bytes: int = MAX_BYTES,
        max_operations: int = MAX_OPERATIONS,
        max_resources: int = MAX_RESOURCES,
    ) -> None:
        super().__init__()
        self.history_size = history_size
        self.operation_ttl = operation_ttl
        self.history_ttl = history_ttl
        self.visibility_timeout = visibility_timeout
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_operations = max_operations
        self.max_resources = max_resources
        self._topics: dict[str, _Topic] = {}
        # Every kept event in publish order, across topics: what goes first when a bound is reached. An
        # entry whose event its topic dropped already (its own cap, expiry) is stale and skipped.
        self._fifo: deque[tuple[_Topic, Cursor]] = deque()
        self.kept_events = 0
        """Events in all topic histories now."""
        self.kept_bytes = 0
        """Bytes of encoded events in all topic histories now."""
        self._operations: dict[str, tuple[Operation, float]] = {}
        self._ended: deque[str] = deque()  # ids of operations in the order they ended: forgotten first
        self._idempotency: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._resources: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self._counters: dict[str, tuple[int, float]] = {}
        self._queues: dict[str, _Queue] = {}
        self._subscribed: set[str] = set()
        self._work_ready = asyncio.Condition()
        self._delivery_seq = 0
        self._sweeper: asyncio.Task[None] | None = None

    # Lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background sweep of expired records."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweep")

    async def close(self) -> None:
        """Stop the sweep."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def ping(self) -> bool:
        """Always reachable."""
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(30)
            self.sweep()

    def sweep(self, now: float | None = None) -> None:
        """Drop every expired operation, topic, idempotency key and resource."""
        now = time.monotonic() if now is None else now
        for store in (self._operations, self._idempotency, self._resources, self._counters):
            for key in [k for k, v in store.items() if v[-1] <= now]:
                del store[key]
        self._ended = deque(i for i in self._ended if i in self._operations)
        for key in [k for k, t in self._topics.items() if t.expires_at <= now]:
            self._discard(self._topics.pop(key))
        self._compact()

    # Commands --------------------------------------------------------------------------
    async def accept(
        self,
        operation: Operation,
        request: Event,
        *,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> Accepted:
        """Store the operation and queue the request event (nothing can interleave: one loop)."""
        now = time.monotonic()
        if idempotency_key is not None:
            seen = self._idempotency.get(idempotency_key)
            if seen is not None and seen[2] > now:
                existing = self._get(seen[0], now)
                if seen[1] != fingerprint:
                    raise IdempotencyConflict(seen[0])
                if existing is not None:
                    return Accepted(existing, created=False)
            self._idempotency[idempotency_key] = (operation.id, fingerprint or "", now + self.operation_ttl)
            self._idempotency.move_to_end(idempotency_key)
            while len(self._idempotency) > self.max_operations:
                self._idempotency.popitem(last=False)
        self._operations[operation.id] = (operation, now + self.operation_ttl)
        self._bound_operations()
        self._delivery_seq += 1
        queue = self._queues.setdefault(request.type, _Queue())
        queue.ready.append((f"d{self._delivery_seq}", request, 0))
        async with self._work_ready:
            self._work_ready.notify_all()
        return Accepted(operation, created=True)

    def _reclaim(self, queue: _Queue, now: float) -> None:
        expired = [d for d, (_, _, deadline) in queue.inflight.items() if deadline <= now]
        for delivery_id in expired:
            event, deliveries, _ = queue.inflight.pop(delivery_id)
            queue.ready.appendleft((delivery_id, event, deliveries))

    def _take(self, types: Sequence[str], count: int) -> list[Delivery]:
        now = time.monotonic()
        out: list[Delivery] = []
        for type_ in types:
            queue = self._queues.get(type_)
            if queue is None:
                continue
            self._reclaim(queue, now)
            while queue.ready and len(out) < count:
                delivery_id, event, deliveries = queue.ready.popleft()
                queue.inflight[delivery_id] = (event, deliveries + 1, now + self.visibility_timeout)
                out.append(Delivery(event=event, delivery_id=f"{type_}|{delivery_id}", deliveries=deliveries + 1))
        return out

    async def consume(
        self, types: Sequence[str], consumer: str, *, count: int = 1, block: float = 1.0
    ) -> list[Delivery]:
        """Hand out ready (or reclaimed) request events, waiting up to ``block`` seconds."""
        deadline = time.monotonic() + block
        while True:
            out = self._take(types, count)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            async with self._work_ready:
                try:
                    # wake at least every 100 ms so reclaimed (timed-out) deliveries are seen
                    await asyncio.wait_for(self._work_ready.wait(), min(remaining, 0.1))
                except TimeoutError:
                    pass

    async def ack(self, delivery: Delivery) -> None:
        """Forget a delivery."""
        self._ack(delivery)

    def _ack(self, delivery: Delivery) -> None:
        type_, delivery_id = delivery.delivery_id.split("|", 1)
        queue = self._queues.get(type_)
        if queue is None or queue.inflight.pop(delivery_id, None) is not None:
            return
        # timed out and made available again, not yet taken: the work is done after all, so drop it
        # (as Redis's XDEL does); a scan, but only on this rare path
        for i, (ready_id, _, _) in enumerate(queue.ready):
            if ready_id == delivery_id:
                del queue.ready[i]
                return

    async def extend(self, deliveries: Sequence[Delivery], consumer: str) -> list[Delivery]:
        """Push the deadline of deliveries still out as handed (same delivery count) one visibility timeout on."""
        deadline = time.monotonic() + self.visibility_timeout
        lost: list[Delivery] = []
        for delivery in deliveries:
            type_, delivery_id = delivery.delivery_id.split("|", 1)
            queue = self._queues.get(type_)
            held = queue.inflight.get(delivery_id) if queue is not None else None
            if queue is None or held is None or held[1] != delivery.deliveries:
                lost.append(delivery)
                continue
            queue.inflight[delivery_id] = (held[0], held[1], deadline)
        return lost

    async def release(self, delivery: Delivery) -> None:
        """Put a delivery back at the front of its queue."""
        type_, delivery_id = delivery.delivery_id.split("|", 1)
        queue = self._queues.get(type_)
        if queue is not None and delivery_id in queue.inflight:
            event, deliveries, _ = queue.inflight.pop(delivery_id)
            queue.ready.appendleft((delivery_id, event, deliveries))
            async with self._work_ready:
                self._work_ready.notify_all()

    # Operations ------------------------------------------------------------------------
    def _get(self, operation_id: str, now: float) -> Operation | None:
        entry = self._operations.get(operation_id)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    async def get_operation(self, operation_id: str) -> Operation | None:
        """The stored operation, or ``None`` if unknown or expired."""
        return self._get(operation_id, time.monotonic())

    async def transition(
        self,
        operation_id: str,
        status: Status,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        location: str | None = None,
        traceparent: str | None = None,
        current: Operation | None = None,
        events: Sequence[tuple[str, Event]] = (),
        ack: Delivery | None = None,
    ) -> Operation:
        """Apply a checked status change: store ``events``, the operation and its status event, ack ``ack``.

        Nothing can interleave (one loop, no await), so the stored operation is never stale here.
        The frames go to the sink after all of it is stored, and a sink that fails is logged, as on
        Redis: nothing a receiver does (the hub writes to sockets from there) can leave events
        published and the operation not ended.
        """
        now = time.monotonic()
        current = self._get(operation_id, now)
        try:
            if current is None:
                raise OperationNotFound(operation_id)
            updated = transition(current, status, result=result, error=error, location=location)
        except (OperationNotFound, IllegalTransition):
            if ack is not None:
                self._ack(ack)  # nothing left to do for this request, as on Redis
            raise
        stored = [(topic, self._store(topic, event, self._ttl(topic)), event) for topic, event in events]
        self._operations[operation_id] = (updated, self._operations[operation_id][1])
        if updated.status.terminal:  # current was not: a terminal operation moves no more
            self._ended.append(operation_id)
        topic = operation_topic(operation_id)
        end = status_event(updated, source=self.source, traceparent=traceparent)
        stored.append((topic, self._store(topic, end, self.operation_ttl), end))
        if ack is not None:
            self._ack(ack)
        # handed to the sink only once all of it is stored: whatever a receiver does, the end is whole
        for topic, cursor, event in stored:
            self._hand(topic, cursor, event)
        return updated

    def _bound_operations(self) -> None:
        """Forget the operations that ended first until at most ``max_operations`` are kept (if enough ended)."""
        ended, operations = self._ended, self._operations
        while len(operations) > self.max_operations and ended:
            entry = operations.get(ended.popleft())
            if entry is not None and entry[0].status.terminal:
                del operations[entry[0].id]

    async def request_cancel(self, operation_id: str) -> Operation:
        """Set the cancel flag for a worker to see."""
        now = time.monotonic()
        current = self._get(operation_id, now)
        if current is None:
            raise OperationNotFound(operation_id)
        updated = cancel_flag(current)
        self._operations[operation_id] = (updated, self._operations[operation_id][1])
        return updated

    # Topics ----------------------------------------------------------------------------
    def _append(self, topic: str, event: Event, ttl: float) -> str:
        cursor = self._store(topic, event, ttl)
        self._hand(topic, cursor, event)
        return cursor

    def _hand(self, topic: str, cursor: str, event: Event) -> None:
        if topic not in self._subscribed:
            return
        try:  # free while nothing raises (3.11)
            self._deliver(Frame.from_event(topic, cursor, event))
        except Exception:  # stored already: a failing sink must not fail the publish, nor cut a fan-out short
            log.exception("the frame sink failed on %s", topic)

    def _store(self, topic: str, event: Event, ttl: float) -> str:
        """Append ``event`` to the topic's history (no fan-out), within the bounds; its cursor."""
        now = time.monotonic()
        state = self._topics.get(topic)
        if state is None or state.expires_at <= now:
            if state is not None:
                self._discard(state)
            state = _Topic(events=deque())  # a new history, so a new epoch
            self._topics[topic] = state
        ms = time.time_ns() // 1_000_000
        key = (ms, 0) if ms > state.last[0] else (state.last[0], state.last[1] + 1)
        state.last = key
        state.expires_at = now + ttl
        cursor = format_cursor(key, state.epoch)
        state.events.append((key, StoredEvent(topic, cursor, event)))
        self._fifo.append((state, key))
        self.kept_events += 1
        self.kept_bytes += len(event.encoded)
        if len(state.events) > self.history_size:
            self._drop_oldest(state)
        if self.kept_events > self.max_events or self.kept_bytes > self.max_bytes:
            self._evict()
        if len(self._fifo) > 2 * self.kept_events + 1024:
            self._compact()
        return cursor

    def _drop_oldest(self, state: _Topic) -> None:
        dropped, stored = state.events.popleft()
        state.dropped = dropped
        self.kept_events -= 1
        self.kept_bytes -= len(stored.event.encoded)

    def _evict(self) -> None:
        """Drop the oldest events of all topics until both bounds hold; forget the topics left empty."""
        fifo = self._fifo
        while fifo and (self.kept_events > self.max_events or self.kept_bytes > self.max_bytes):
            state, key = fifo.popleft()
            events = state.events
            # Every older entry of this topic was popped before this one, so its event, if still kept, is the
            # topic's oldest: anything else means the topic dropped it already.
            if not events or events[0][0] != key:
                continue
            topic = events[0][1].topic
            self._drop_oldest(state)
            self.evicted += 1
            if not events and self._topics.get(topic) is state:
                del self._topics[topic]  # nothing left: its next event starts a new history (and epoch)

    def _discard(self, state: _Topic) -> None:
        """Forget a topic's history (expired or replaced): its events stop counting, its FIFO entries go stale."""
        self.kept_events -= len(state.events)
        self.kept_bytes -= sum(len(stored.event.encoded) for _, stored in state.events)
        state.events.clear()

    def _compact(self) -> None:
        """Rebuild the FIFO without its stale entries (when they outnumber the live ones; amortised O(1))."""
        self._fifo = deque((state, key) for state, key in self._fifo if state.events and key >= state.events[0][0])

    async def publish(self, topic: str, event: Event) -> str:
        """Append to the topic's capped history and hand it to the sink if subscribed."""
        return self._append(topic, event, self._ttl(topic))

    def _ttl(self, topic: str) -> float:
        return self.operation_ttl if topic.startswith("operations/") else self.history_ttl

    def _live(self, topic: str) -> _Topic | None:
        state = self._topics.get(topic)
        if state is None or state.expires_at <= time.monotonic():
            return None
        return state

    async def read(self, topic: str, after: str | None, *, limit: int = 1000) -> HistoryPage:
        """Kept events after a cursor, and whether some between were already dropped (or the history lost)."""
        state = self._live(topic)
        key, epoch = split_cursor(after) if after is not None else ((0, -1), None)
        reset = history_lost(epoch, state.epoch if state is not None else None)
        if state is None:
            return HistoryPage(events=[], truncated=reset, oldest=None, reset=reset)
        if reset:
            key = (0, -1)  # its position means nothing in this history: all of it, after a gap
        events = [stored for k, stored in state.events if k > key][:limit]
        truncated = reset or (state.dropped is not None and key < state.dropped)
        oldest = state.events[0][1].cursor if state.events else None
        return HistoryPage(events=events, truncated=truncated, oldest=oldest, reset=reset)

    async def tail(self, topic: str, count: int) -> list[StoredEvent]:
        """The newest events of a topic."""
        state = self._live(topic)
        if state is None or count <= 0:
            return []
        return [stored for _, stored in list(state.events)[-count:]]

    async def head(self, topic: str) -> str | None:
        """The newest cursor of a topic."""
        state = self._live(topic)
        if state is None or not state.events:
            return None
        return state.events[-1][1].cursor

    async def subscribe(self, topic: str) -> None:
        """Start handing the topic's new frames to the sink."""
        self._subscribed.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop handing the topic's frames to the sink."""
        self._subscribed.discard(topic)

    # Counters --------------------------------------------------------------------------
    async def hit(self, key: str, window: int, amount: int = 1) -> int:
        """Count ``amount`` more hits on ``key`` in its window."""
        now = time.monotonic()
        count, expires_at = self._counters.get(key, (0, 0.0))
        if expires_at <= now:
            count, expires_at = 0, now + window
        self._counters[key] = (count + amount, expires_at)
        return count + amount

    # Resources -------------------------------------------------------------------------
    async def put_resource(self, path: str, document: dict[str, Any], *, ttl: int) -> None:
        """Keep a document for ``ttl`` seconds (within ``max_resources``: the least recently written go first)."""
        self._put(path, document, time.monotonic() + ttl)

    def _put(self, path: str, document: dict[str, Any], expires_at: float) -> None:
        resources = self._resources
        resources[path] = (document, expires_at)
        resources.move_to_end(path)
        while len(resources) > self.max_resources:
            resources.popitem(last=False)

    async def get_resource(self, path: str) -> dict[str, Any] | None:
        """The document, or ``None`` if missing or expired."""
        entry = self._resources.get(path)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    async def update_resource(
        self, path: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], *, ttl: int
    ) -> dict[str, Any] | None:
        """Apply ``change`` to the live document (no await in between: atomic on the event loop)."""
        now = time.monotonic()
        entry = self._resources.get(path)
        if entry is None or entry[1] <= now:
            return None
        changed = change(entry[0])
        if changed is None:
            return entry[0]
        self._put(path, changed, now + ttl)
        return changed

    async def put_resource_if_absent(self, path: str, document: dict[str, Any], *, ttl: int) -> dict[str, Any]:
        """The live document under ``path``, or ``document`` after storing it for ``ttl`` seconds."""
        now = time.monotonic()
        entry = self._resources.get(path)
        if entry is not None and entry[1] > now:
            return entry[0]
        self._put(path, document, now + ttl)
        return document
