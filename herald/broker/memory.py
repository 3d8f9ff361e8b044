"""MemoryBroker: the embedded default, everything inside one process.

The same contract as the Redis broker, kept in dicts and deques: used when
``REDIS_URL`` is unset, and by the test suite as the reference implementation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
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
from herald.protocol import Cursor, Frame, format_cursor, parse_cursor

log = logging.getLogger("herald.broker.memory")


@dataclass(slots=True)
class _Topic:
    events: deque[tuple[Cursor, StoredEvent]]
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
    ) -> None:
        super().__init__()
        self.history_size = history_size
        self.operation_ttl = operation_ttl
        self.history_ttl = history_ttl
        self.visibility_timeout = visibility_timeout
        self._topics: dict[str, _Topic] = {}
        self._operations: dict[str, tuple[Operation, float]] = {}
        self._idempotency: dict[str, tuple[str, str, float]] = {}
        self._resources: dict[str, tuple[dict[str, Any], float]] = {}
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
        for key in [k for k, t in self._topics.items() if t.expires_at <= now]:
            del self._topics[key]

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
        self._operations[operation.id] = (operation, now + self.operation_ttl)
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
        topic = operation_topic(operation_id)
        end = status_event(updated, source=self.source, traceparent=traceparent)
        stored.append((topic, self._store(topic, end, self.operation_ttl), end))
        if ack is not None:
            self._ack(ack)
        # handed to the sink only once all of it is stored: whatever a receiver does, the end is whole
        for topic, cursor, event in stored:
            self._hand(topic, cursor, event)
        return updated

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
        """Append ``event`` to the topic's history (no fan-out); its cursor."""
        now = time.monotonic()
        state = self._topics.get(topic)
        if state is None or state.expires_at <= now:
            state = _Topic(events=deque())
            self._topics[topic] = state
        ms = time.time_ns() // 1_000_000
        key = (ms, 0) if ms > state.last[0] else (state.last[0], state.last[1] + 1)
        state.last = key
        state.expires_at = now + ttl
        cursor = format_cursor(key)
        state.events.append((key, StoredEvent(topic, cursor, event)))
        if len(state.events) > self.history_size:
            state.dropped = state.events.popleft()[0]
        return cursor

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
        """Kept events after a cursor, and whether some between were already dropped."""
        state = self._live(topic)
        if state is None:
            return HistoryPage(events=[], truncated=False, oldest=None)
        key = parse_cursor(after) if after is not None else (0, -1)
        events = [stored for k, stored in state.events if k > key][:limit]
        truncated = state.dropped is not None and key < state.dropped
        oldest = state.events[0][1].cursor if state.events else None
        return HistoryPage(events=events, truncated=truncated, oldest=oldest)

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
        """Keep a document for ``ttl`` seconds."""
        self._resources[path] = (document, time.monotonic() + ttl)

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
        self._resources[path] = (changed, now + ttl)
        return changed

    async def put_resource_if_absent(self, path: str, document: dict[str, Any], *, ttl: int) -> dict[str, Any]:
        """The live document under ``path``, or ``document`` after storing it for ``ttl`` seconds."""
        now = time.monotonic()
        entry = self._resources.get(path)
        if entry is not None and entry[1] > now:
            return entry[0]
        self._resources[path] = (document, now + ttl)
        return document
