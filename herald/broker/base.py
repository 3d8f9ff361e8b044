"""The Broker interface: what carries events and operation state between processes.

A broker has three jobs, and every implementation does all three the same way:

* **Request events** (commands) go to competing consumers: each is handed to exactly one
  worker, and handed out again when that worker does not acknowledge it within the
  visibility timeout (at least once); a worker that is still at it renews the timeout
  with :meth:`Broker.extend`.
* **Topics** are ordered, capped histories with cursors, plus live fan-out to the
  topics this process listens to (one broker-level subscription per topic per process;
  the hub multiplexes local connections on top). When the fan-out lost more of a topic
  than its history still holds, the gap sink is told (see :meth:`Broker.set_gap_sink`).
  Each history has an epoch, made when it starts from nothing and carried in its cursors
  (:mod:`herald.protocol`), so a history that was lost is told from one that is up to date.
* **Operations** are records changed only by transition-checked, atomic updates; every
  change appends a ``herald.operation.<status>`` event to the operation's topic in the
  same atomic step, so a watcher can never see a state without its event.

Errors::

    BrokerError
    ├── BrokerUnavailable      the backing store cannot be reached; retry later (HTTP 503)
    ├── IdempotencyConflict    the key was used with another request body (HTTP 422)
    ├── IdempotencyInProgress  the first request with the key is still being accepted (HTTP 409)
    └── OperationNotFound      unknown or expired operation id (HTTP 404)

``IllegalTransition`` (from :mod:`herald.operations`) is raised for a forbidden status change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from herald.events import Event
from herald.operations import Operation, Status, new_operation_id
from herald.protocol import Frame


class BrokerError(Exception):
    """Root of the broker's errors."""


class BrokerUnavailable(BrokerError):
    """The broker's backing store cannot be reached right now."""


class IdempotencyConflict(BrokerError):
    """An idempotency key was reused with a different request."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(f"idempotency key already used for operation {operation_id} with another request")
        self.operation_id = operation_id


class IdempotencyInProgress(BrokerError):
    """The first request with this idempotency key is still being accepted (a broker whose accept takes more than
    one atomic step: the ClusterBroker); ask again shortly."""


class OperationNotFound(BrokerError):
    """No operation with that id (never existed, or expired)."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored in a topic's history, with its cursor."""

    topic: str
    cursor: str
    event: Event


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Events read from a topic after a cursor.

    ``truncated`` is true when the cursor is older than the oldest event still kept,
    so events may have been dropped between the two: the client must be told. ``reset`` is
    true when the cursor named another epoch of the topic's history, or one that is gone
    (:func:`herald.protocol.history_lost`): its position means nothing in the history kept now,
    so ``events`` start at the oldest kept (``truncated`` is true as well).
    """

    events: list[StoredEvent]
    truncated: bool
    oldest: str | None
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    """A request event handed to one consumer, to be acknowledged with :meth:`Broker.ack`."""

    event: Event
    delivery_id: str
    deliveries: int  # how many times this request event has been handed out, this one included
    operation: Operation | None = field(default=None, compare=False)
    """The operation as it was accepted, when the broker queued it with the request (a worker taking a first
    delivery moves it to ``running`` from this copy, without reading it; a stale copy is read again)."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """The result of :meth:`Broker.accept`: the operation and whether this call created it."""

    operation: Operation
    created: bool


FrameSink = Callable[[Frame], None]
"""Where a broker hands live frames of the topics this process listens to (the hub)."""

class GapSink(Protocol):
    """Who is told when live frames of a topic were lost beyond its history (the hub)."""

    def __call__(self, topic: str, oldest: str | None, *, epoch: str | None = None, reset: bool = False) -> None:
        """``oldest``: the oldest cursor still kept; ``epoch``: the epoch of the positions the loss is measured
        from; ``reset``: the history itself was lost (those positions mean nothing in the one kept now)."""


class Broker(ABC):
    """What the gateway, the hub and the workers need from a broker."""

    source: str = "herald"
    visibility_timeout: float = 30.0
    """Seconds a delivery stays with its consumer, unacknowledged, before it is handed out again."""

    def __init__(self) -> None:
        self._sink: FrameSink | None = None
        self._gap_sink: GapSink | None = None
        self.errors = 0
        """Calls that failed because the backing store was unreachable (implementations count them)."""
        self.reconnects = 0
        """Times the live fan-out connection was re-opened after a loss (implementations count them)."""
        self.evicted = 0
        """Topic events dropped to keep the broker within its memory bound (MemoryBroker; Redis has its own)."""

    def set_sink(self, sink: FrameSink) -> None:
        """Register the single receiver of live frames (the process's hub)."""
        self._sink = sink

    def set_gap_sink(self, sink: GapSink) -> None:
        """Register who is told when the live fan-out of a topic lost more than its history can fill."""
        self._gap_sink = sink

    def _deliver(self, frame: Frame) -> None:
        if self._sink is not None:
            self._sink(frame)

    def _gap(self, topic: str, oldest: str | None, *, epoch: str | None = None, reset: bool = False) -> None:
        # Called before the frames still kept are handed over, so a client hears of the gap first.
        if self._gap_sink is not None:
            self._gap_sink(topic, oldest, epoch=epoch, reset=reset)

    # Lifecycle -------------------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None:
        """Open connections; idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Close connections and stop background tasks."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the backing store answers right now."""

    # Commands --------------------------------------------------------------------------
    def operation_id(self, idempotency_key: str | None = None) -> str:
        """A new id for an operation to :meth:`accept` (given the idempotency key it will be accepted with).

        A broker may place an operation by its id: the ClusterBroker makes the id of one accepted with an
        idempotency key land in the slot of the key's record, and refuses an id it did not make for that key.
        """
        return new_operation_id()

    @abstractmethod
    async def accept(
        self,
        operation: Operation,
        request: Event,
        *,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> Accepted:
        """Store a new operation and queue its request event, atomically.

        With an idempotency key already seen: the same ``fingerprint`` returns the
        stored operation (``created=False``); another raises :class:`IdempotencyConflict`.
        """

    @abstractmethod
    async def consume(
        self, types: Sequence[str], consumer: str, *, count: int = 1, block: float = 1.0
    ) -> list[Delivery]:
        """Up to ``count`` request events of these types for this consumer, waiting up to ``block`` s.

        Events handed out earlier and not acknowledged within the visibility timeout come first, once the
        broker has looked for them: it may do so only every fraction of a second while new events keep
        coming (RedisBroker: at most once per blocking slice, always when no new event was found).
        """

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Mark a delivery done, so it is never handed out again."""

    @abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Give a delivery back unfinished, so another consumer may take it at once."""

    @abstractmethod
    async def extend(self, deliveries: Sequence[Delivery], consumer: str) -> list[Delivery]:
        """Keep these deliveries with ``consumer`` for another visibility timeout (a worker's lease on its jobs).

        Returns the ones that are no longer this consumer's (handed out again, acknowledged or
        released), which are left as they are.
        """

    # Operations ------------------------------------------------------------------------
    @abstractmethod
    async def get_operation(self, operation_id: str) -> Operation | None:
        """The stored operation, or ``None``."""

    @abstractmethod
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
        """Apply a checked status change and publish its status event, atomically.

        ``current`` is the caller's latest copy of the operation, if it has one: a broker may start
        from it instead of reading the operation first (a stale copy is found out and read again).

        In the same atomic step (one round trip on Redis), when the move is applied: each
        ``(topic, event)`` of ``events`` is published first (as :meth:`publish` would, so it comes
        before the status event on the operation's topic), and ``ack``, the delivery of the request
        being handled, is acknowledged. When the operation is missing or the move is illegal, nothing
        is published but ``ack`` is still acknowledged (the request has nothing left to do), and
        :class:`OperationNotFound` or ``IllegalTransition`` is raised. A copy found stale is read
        again and the move retried, so the events are published exactly once.
        """

    @abstractmethod
    async def request_cancel(self, operation_id: str) -> Operation:
        """Set the operation's cancel flag; ``IllegalTransition`` if it already ended."""

    # Topics ----------------------------------------------------------------------------
    @abstractmethod
    async def publish(self, topic: str, event: Event) -> str:
        """Append an event to a topic's history, fan it out, and return its cursor."""

    async def publish_many(self, items: Sequence[tuple[str, Event]]) -> list[str]:
        """Publish each ``(topic, event)`` in order and return their cursors (one round trip where it can)."""
        return [await self.publish(topic, event) for topic, event in items]

    @abstractmethod
    async def read(self, topic: str, after: str | None, *, limit: int = 1000) -> HistoryPage:
        """Events after ``after`` (``None``: from the oldest kept), oldest first.

        A cursor whose epoch is not the topic's current one (or that names an epoch while the topic has no
        history) gets the history from its oldest kept event, with ``truncated`` and ``reset`` set.
        """

    @abstractmethod
    async def tail(self, topic: str, count: int) -> list[StoredEvent]:
        """The newest ``count`` events of a topic, oldest first."""

    @abstractmethod
    async def head(self, topic: str) -> str | None:
        """The cursor of the newest event in a topic, or ``None`` if it has none."""

    @abstractmethod
    async def subscribe(self, topic: str) -> None:
        """Start handing this topic's live frames to the sink."""

    @abstractmethod
    async def unsubscribe(self, topic: str) -> None:
        """Stop handing this topic's live frames to the sink."""

    # Counters ---------------------------------------------------------------------------
    @abstractmethod
    async def hit(self, key: str, window: int, amount: int = 1) -> int:
        """Add ``amount`` (one hit, or a batch's events) to the counter ``key`` and return its new value; the
        counter vanishes ``window`` s after its first hit.

        The fixed-window counter behind ``HERALD_RATE_LIMIT`` and ``HERALD_PUBLISH_RATE``, shared by every
        gateway process on the same broker (callers put the window's number in ``key``). RedisBroker:
        ``INCRBY`` and ``EXPIRE`` in one ``MULTI`` pipeline, so a counter never outlives its window.
        """

    # Resources (read models of the domains built on Herald) ----------------------------
    @abstractmethod
    async def put_resource(self, path: str, document: dict[str, Any], *, ttl: int) -> None:
        """Store a JSON document under a resource path (e.g. ``/orders/42``)."""

    @abstractmethod
    async def get_resource(self, path: str) -> dict[str, Any] | None:
        """The document stored under a resource path, or ``None``."""

    @abstractmethod
    async def update_resource(
        self, path: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], *, ttl: int
    ) -> dict[str, Any] | None:
        """Replace the document under ``path`` with ``change(document)``, atomically; ``None`` if there is none.

        ``change`` returns the new document, or ``None`` to leave it as it is; it may be called more
        than once (Redis retries it when another writer got in between), so it must not have other
        effects. Returns the document now stored. Two concurrent updates never lose one another.
        """

    @abstractmethod
    async def put_resource_if_absent(self, path: str, document: dict[str, Any], *, ttl: int) -> dict[str, Any]:
        """Store ``document`` for ``ttl`` seconds unless a document is stored under ``path`` already; atomic.

        Returns the document now stored there: the earlier one (unchanged, its TTL too) or ``document``.
        A redelivered handler so keeps what its first run stored, in one round trip instead of a
        get and a put.
        """
