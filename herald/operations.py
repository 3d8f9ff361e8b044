"""The operation model and its state machine. No I/O.

An operation is the resource that tracks one command: its id is the correlation id
of every event about it. Its status moves only forward::

    pending ──▶ running ──▶ succeeded | failed | canceled
       └──────────────────▶ succeeded | failed | canceled

Terminal statuses never change again; :func:`transition` refuses an illegal move
instead of applying it. The broker applies the same table atomically (the Redis
broker carries it into Lua from :data:`ALLOWED`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from herald.events import Event, build_event, now_iso
from herald.protocol import STATUS_EVENT_PREFIX


class Status(StrEnum):
    """Where an operation is in its life."""

    PENDING = "pending"  # accepted and stored; no worker has started it
    RUNNING = "running"  # a worker is handling it (again, after a redelivery)
    SUCCEEDED = "succeeded"  # finished; ``result`` and maybe ``location`` are set
    FAILED = "failed"  # finished with a problem in ``error``
    CANCELED = "canceled"  # a cancel was asked for and a worker honoured it

    @property
    def terminal(self) -> bool:
        """Whether this status is final."""
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.RUNNING, *TERMINAL}),
    # running → running is a redelivery to another worker (the attempt counter moves on)
    Status.RUNNING: frozenset({Status.RUNNING, *TERMINAL}),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELED: frozenset(),
}


class IllegalTransition(ValueError):
    """A status change the state machine forbids (e.g. anything out of a terminal status)."""

    def __init__(self, current: Status, wanted: Status) -> None:
        super().__init__(f"operation is {current.value}; it cannot become {wanted.value}")
        self.current = current
        self.wanted = wanted


def new_operation_id() -> str:
    """An unguessable operation id (128 random bits, URL-safe)."""
    return "op_" + secrets.token_urlsafe(16)


def operation_topic(operation_id: str) -> str:
    """The topic that carries an operation's events."""
    return f"operations/{operation_id}"


@dataclass(frozen=True, slots=True)
class Operation:
    """The state of one command, as stored by the broker."""

    id: str
    type: str
    status: Status = Status.PENDING
    created_at: str = field(default_factory=now_iso)
    updated_at: str = ""
    version: int = 1
    result: Any = None
    error: dict[str, Any] | None = None
    location: str | None = None
    owner: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    request_event_id: str | None = None

    def __post_init__(self) -> None:
        if not self.updated_at:
            object.__setattr__(self, "updated_at", self.created_at)

    @property
    def etag(self) -> str:
        """A strong ETag that changes with every stored change."""
        return f'"{self.id}.{self.version}"'

    def to_record(self) -> dict[str, Any]:
        """Every field, for storage."""
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "version": self.version,
            "result": self.result,
            "error": self.error,
            "location": self.location,
            "owner": self.owner,
            "cancel_requested": self.cancel_requested,
            "attempts": self.attempts,
            "request_event_id": self.request_event_id,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Operation:
        """The inverse of :meth:`to_record`."""
        return cls(
            id=record["id"],
            type=record["type"],
            status=Status(record["status"]),
            created_at=record["created_at"],
            updated_at=record["updated_at"],
            version=int(record["version"]),
            result=record.get("result"),
            error=record.get("error"),
            location=record.get("location"),
            owner=record.get("owner"),
            cancel_requested=bool(record.get("cancel_requested")),
            attempts=int(record.get("attempts") or 0),
            request_event_id=record.get("request_event_id"),
        )


def transition(
    op: Operation,
    status: Status,
    *,
    result: Any = None,
    error: dict[str, Any] | None = None,
    location: str | None = None,
    now: str | None = None,
) -> Operation:
    """The operation after moving to ``status``; raises :class:`IllegalTransition` if forbidden."""
    if status not in ALLOWED[op.status]:
        raise IllegalTransition(op.status, status)
    attempts, new_result, new_error, new_location = op.attempts, op.result, op.error, op.location
    if status is Status.RUNNING:
        attempts += 1
    elif status is Status.SUCCEEDED:
        new_result, new_location = result, location
    elif status is Status.FAILED:
        new_error = error or problem("about:blank", "Operation failed", 500)
    elif status is Status.CANCELED:
        new_error = error or problem(
            "https://herald.dev/problems/canceled", "Operation canceled", 409, "canceled at the client's request"
        )
    # built field by field: dataclasses.replace() looks the fields up again on every call (a worker moves
    # each operation twice)
    return Operation(id=op.id, type=op.type, status=status, created_at=op.created_at, updated_at=now or now_iso(),
                     version=op.version + 1, result=new_result, error=new_error, location=new_location,
                     owner=op.owner, cancel_requested=op.cancel_requested, attempts=attempts,
                     request_event_id=op.request_event_id)


def request_cancel(op: Operation, *, now: str | None = None) -> Operation:
    """The operation with its cancel flag set; raises :class:`IllegalTransition` if it already ended."""
    if op.status.terminal:
        raise IllegalTransition(op.status, Status.CANCELED)
    if op.cancel_requested:
        return op
    return replace(op, cancel_requested=True, updated_at=now or now_iso(), version=op.version + 1)


def problem(type_: str, title: str, status: int, detail: str | None = None, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem document as a dict."""
    doc: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        doc["detail"] = detail
    doc.update(extra)
    return doc


def status_event(
    op: Operation, *, source: str, causationid: str | None = None, traceparent: str | None = None
) -> Event:
    """The ``herald.operation.<status>`` event published on the operation's topic after a change."""
    return build_event(
        STATUS_EVENT_PREFIX + op.status.value,
        {
            "id": op.id,
            "status": op.status.value,
            "result": op.result,
            "error": op.error,
            "location": op.location,
            "attempts": op.attempts,
        },
        source=source,
        subject=operation_topic(op.id),
        correlationid=op.id,
        causationid=causationid or op.request_event_id,
        traceparent=traceparent,
    )
