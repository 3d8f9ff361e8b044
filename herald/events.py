"""The CloudEvents 1.0 envelope: build, validate, encode once, decode. No I/O.

Every event Herald carries is a CloudEvents JSON envelope with two extensions:
``correlationid`` (the operation id) and ``causationid`` (the id of the event that
caused it). An :class:`Event` is immutable once built and keeps its JSON encoding,
so a fan-out to ten thousand connections encodes it exactly once.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import time
from datetime import datetime
from typing import Any

import orjson

SPECVERSION = "1.0"
JSON = "application/json"

# Always used with fullmatch: "$" alone would let a trailing newline through into SSE "event:" lines.
_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,127}")
_REQUIRED = ("specversion", "id", "source", "type")
_KNOWN = frozenset(
    (
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "data",
        "correlationid",
        "causationid",
        "traceparent",
    )
)
_EXTENSION_RE = re.compile(r"[a-z0-9]{1,20}")


class EventError(ValueError):
    """An envelope that is not a valid CloudEvents 1.0 JSON event; the message says why."""


_id_prefix = os.urandom(10)
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(10), itertools.count()


os.register_at_fork(after_in_child=_new_id_prefix)  # a forked process must not repeat its parent's ids


def new_event_id() -> str:
    """A URL-safe, 128-bit event id, unique but not secret: 80 random bits per process, then a counter.

    A random id from the system (``secrets``) each time cost a ``getrandom`` system call per event,
    three per command in a worker; an event id names an event, it guards nothing.
    """
    return base64.urlsafe_b64encode(_id_prefix + next(_id_counter).to_bytes(6, "big")).decode().rstrip("=")


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def now_iso() -> str:
    """The current UTC time as RFC 3339 with milliseconds, as CloudEvents ``time`` wants.

    The date and time of day are formatted once per second: a worker stamps several events and
    records per command, and ``datetime.now().isoformat()`` each time was 7% of its CPU.
    """
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


class Event:
    """One immutable CloudEvents envelope and its cached JSON encoding."""

    __slots__ = (
        "_encoded",
        "causationid",
        "correlationid",
        "data",
        "extensions",
        "id",
        "source",
        "subject",
        "time",
        "traceparent",
        "type",
    )

    id: str
    source: str
    type: str
    time: str
    subject: str | None
    data: Any
    correlationid: str | None
    causationid: str | None
    traceparent: str | None
    extensions: dict[str, Any]
    _encoded: bytes | None

    def __init__(
        self,
        *,
        id: str,
        source: str,
        type: str,
        time: str,
        data: Any = None,
        subject: str | None = None,
        correlationid: str | None = None,
        causationid: str | None = None,
        traceparent: str | None = None,
        extensions: dict[str, Any] | None = None,
        encoded: bytes | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "id", id)
        set_(self, "source", source)
        set_(self, "type", type)
        set_(self, "time", time)
        set_(self, "data", data)
        set_(self, "subject", subject)
        set_(self, "correlationid", correlationid)
        set_(self, "causationid", causationid)
        set_(self, "traceparent", traceparent)
        set_(self, "extensions", extensions or {})
        set_(self, "_encoded", encoded)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Event is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Event(type={self.type!r}, id={self.id!r}, correlationid={self.correlationid!r})"

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a JSON-ready dict (optional attributes left out when unset)."""
        out: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": JSON,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        if self.correlationid is not None:
            out["correlationid"] = self.correlationid
        if self.causationid is not None:
            out["causationid"] = self.causationid
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        out.update(self.extensions)
        out["data"] = self.data
        return out

    @property
    def encoded(self) -> bytes:
        """The envelope as compact JSON bytes, computed on first use and then reused."""
        enc = self._encoded
        if enc is None:
            enc = orjson.dumps(self.to_dict())
            object.__setattr__(self, "_encoded", enc)
        return enc


def build_event(
    type: str,
    data: Any = None,
    *,
    source: str,
    subject: str | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
    traceparent: str | None = None,
    extensions: dict[str, Any] | None = None,
) -> Event:
    """A new event with a fresh id and the current time; raises :class:`EventError` if invalid."""
    if not _TYPE_RE.fullmatch(type):
        raise EventError(f"event type {type!r} must be 1-128 letters, digits, '.', '_' or '-'")
    if not source:
        raise EventError("event source must not be empty")
    for name in extensions or {}:
        if name in _KNOWN or not _EXTENSION_RE.fullmatch(name):
            raise EventError(f"extension attribute {name!r} must be 1-20 lowercase letters or digits")
    return Event(
        id=new_event_id(),
        source=source,
        type=type,
        time=now_iso(),
        data=data,
        subject=subject,
        correlationid=correlationid,
        causationid=causationid,
        traceparent=traceparent,
        extensions=dict(extensions) if extensions else None,
    )


def _opt_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EventError(f"'{name}' must be a non-empty string")
    return value


def event_from_dict(doc: Any, *, encoded: bytes | None = None) -> Event:
    """Validate a decoded envelope and build the :class:`Event`; raises :class:`EventError`."""
    if not isinstance(doc, dict):
        raise EventError("an event must be a JSON object")
    for name in _REQUIRED:
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise EventError(f"'{name}' is required and must be a non-empty string")
    if doc["specversion"] != SPECVERSION:
        raise EventError(f"'specversion' must be {SPECVERSION!r}")
    if not _TYPE_RE.fullmatch(doc["type"]):
        raise EventError("'type' must be 1-128 letters, digits, '.', '_' or '-'")
    content_type = doc.get("datacontenttype", JSON)
    if content_type != JSON:
        raise EventError(f"'datacontenttype' must be {JSON!r}")
    time_ = doc.get("time")
    if time_ is None:
        time_ = now_iso()
    elif not isinstance(time_, str):
        raise EventError("'time' must be an RFC 3339 string")
    else:
        try:
            datetime.fromisoformat(time_.replace("Z", "+00:00"))
        except ValueError as exc:
            raise EventError("'time' must be an RFC 3339 timestamp") from exc
    extensions: dict[str, Any] = {}
    for name, value in doc.items():
        if name in _KNOWN:
            continue
        if not _EXTENSION_RE.fullmatch(name):
            raise EventError(f"unknown attribute {name!r}: extensions are 1-20 lowercase letters or digits")
        if not isinstance(value, (str, int, bool)):
            raise EventError(f"extension {name!r} must be a string, integer or boolean")
        extensions[name] = value
    return Event(
        id=doc["id"],
        source=doc["source"],
        type=doc["type"],
        time=time_,
        data=doc.get("data"),
        subject=_opt_str(doc, "subject"),
        correlationid=_opt_str(doc, "correlationid"),
        causationid=_opt_str(doc, "causationid"),
        traceparent=_opt_str(doc, "traceparent"),
        extensions=extensions or None,
        encoded=encoded,
    )


def decode_event(raw: bytes | str) -> Event:
    """Parse JSON bytes into a validated :class:`Event`, keeping the bytes as its encoding.

    Bytes with a line break (JSON pretty-printed by some other producer) are not kept: an
    SSE ``data:`` line cannot hold one, so such an event is encoded afresh, compactly.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"not valid JSON: {exc}") from exc
    encoded: bytes | None = raw.encode() if isinstance(raw, str) else bytes(raw)
    if encoded is not None and (b"\n" in encoded or b"\r" in encoded):
        encoded = None
    return event_from_dict(doc, encoded=encoded)
