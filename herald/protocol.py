"""SSE and WebSocket framing, cursors and resume. No I/O.

Bytes in, bytes out. A :class:`Frame` is one event of one topic, framed once for
SSE and once for WebSocket and then written as-is to every connection that follows
the topic.

Cursors are ``"<milliseconds>-<sequence>.<epoch>"`` strings, e.g. ``"1712345678901-0.k3x9qa"``:
the position is the shape of a Redis Stream id (which the memory broker also produces),
totally ordered within one history of a topic; the *epoch* (1-8 characters of ``0-9a-z``)
names that history. A topic's history gets a new epoch whenever it starts again from nothing
(a Redis flush, a failover to an empty replica, eviction or expiry, a memory broker that
restarted), so a cursor of another epoch, or of a history that is gone, can be told apart from
one that is merely up to date: it is answered with a gap from the start of the current history,
never with silence (:func:`history_lost`). A plain ``"<milliseconds>-<sequence>"`` cursor (as
Herald handed out before epochs, and ``"0-0"``, "before the first event") is still accepted and
is read without the epoch check.

A connection that follows several topics over SSE uses a *vector cursor*: the topics'
cursors joined by ``,`` in the order the topics were requested; an empty slot means "nothing
seen yet". Neither ``,`` nor a line break can occur in a cursor, so it is a valid SSE ``id:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from herald.events import Event

Cursor = tuple[int, int]
"""A cursor's position, ``(milliseconds, sequence)``: ordered within one epoch of a topic's history."""

# ASCII digits only ("\d" would take other scripts' digits), matched in full (so no trailing newline).
_CURSOR_RE = re.compile(r"([0-9]{1,16})-([0-9]{1,16})(?:\.([0-9a-z]{1,8}))?")
_EPOCH_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Segments "." and ".." are refused: a URL holding them is rewritten by clients and proxies (path traversal).
TOPIC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:@]{0,127}(/(?!\.\.?(?:/|\Z))[A-Za-z0-9_\-.:@]{1,128}){0,3}")
MAX_TOPIC_LENGTH = 200


class ProtocolError(ValueError):
    """A client sent a cursor, topic or frame that Herald cannot use; the message says why."""


def split_cursor(raw: str) -> tuple[Cursor, str | None]:
    """``"123-4.k3x9"`` → ``((123, 4), "k3x9")``, ``"123-4"`` → ``((123, 4), None)``; :class:`ProtocolError` else."""
    match = _CURSOR_RE.fullmatch(raw)
    if match is None:
        raise ProtocolError(f"cursor {raw[:40]!r} is not of the form <number>-<number>[.<epoch>]")
    return (int(match.group(1)), int(match.group(2))), match.group(3)


def parse_cursor(raw: str) -> Cursor:
    """``"123-4.k3x9"`` or ``"123-4"`` → ``(123, 4)``, the position alone; raises :class:`ProtocolError` else."""
    return split_cursor(raw)[0]


def format_cursor(cursor: Cursor, epoch: str | None = None) -> str:
    """``(123, 4), "k3x9"`` → ``"123-4.k3x9"``; without an epoch, ``"123-4"``."""
    if epoch is None:
        return f"{cursor[0]}-{cursor[1]}"
    return f"{cursor[0]}-{cursor[1]}.{epoch}"


def join_cursor(position: str, epoch: str | None) -> str:
    """A stored position (a Redis Stream id) and its history's epoch: ``"123-4"``, ``"k3x9"`` → ``"123-4.k3x9"``."""
    return position if epoch is None else f"{position}.{epoch}"


def format_epoch(number: int) -> str:
    """A non-negative number as an epoch, in base 36 (``2176782335`` → ``"zzzzzz"``); 8 characters at most."""
    if not 0 <= number < 36**8:
        raise ValueError("an epoch is a number from 0 to 36**8 - 1")
    out = ""
    while True:
        number, digit = divmod(number, 36)
        out = _EPOCH_DIGITS[digit] + out
        if number == 0:
            return out


def history_lost(epoch: str | None, current: str | None) -> bool:
    """Whether a cursor of ``epoch`` points into a history other than the topic's ``current`` one.

    ``current`` is ``None`` when the topic has no history now (never written, or lost). A plain
    cursor (no epoch) is never taken for lost: it is read as before epochs existed.
    """
    return epoch is not None and epoch != current


def validate_topic(topic: str) -> str:
    """The topic if it is a legal name (letters, digits, ``_-.:@``, up to four ``/`` segments)."""
    if not topic or len(topic) > MAX_TOPIC_LENGTH or not TOPIC_RE.fullmatch(topic):
        raise ProtocolError(
            "topic names are 1-200 characters: letters, digits and _-.:@ in up to four /-separated segments"
        )
    return topic


def parse_vector_cursor(raw: str, topic_count: int) -> list[str | None]:
    """Split a vector cursor into one cursor (or ``None``) per topic; validates every slot."""
    parts = raw.split(",")
    if len(parts) != topic_count:
        raise ProtocolError(f"cursor has {len(parts)} slots but the stream follows {topic_count} topics")
    out: list[str | None] = []
    for part in parts:
        if part == "":
            out.append(None)
        else:
            parse_cursor(part)
            out.append(part)
    return out


def format_vector_cursor(cursors: list[str | None]) -> str:
    """The inverse of :func:`parse_vector_cursor`."""
    return ",".join(c or "" for c in cursors)


# SSE ---------------------------------------------------------------------------------

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]
SSE_HEARTBEAT = b":\n\n"


def sse_retry(retry_ms: int) -> bytes:
    """The ``retry:`` field that opens every stream."""
    return b"retry: %d\n\n" % retry_ms


def sse_frame(name: str, data: bytes, cursor: str | None = None) -> bytes:
    """One SSE message. ``data`` must be single-line (compact JSON always is)."""
    if "\n" in name or "\r" in name or b"\n" in data or b"\r" in data:
        raise ValueError("SSE fields must not contain line breaks")
    head = b"event: " + name.encode() + b"\n"
    if cursor is not None:
        head = b"id: " + cursor.encode() + b"\n" + head
    return head + b"data: " + data + b"\n\n"


def sse_control(name: str, payload: dict[str, Any], cursor: str | None = None) -> bytes:
    """A Herald control message (``herald.gap``, ``herald.disconnect``) as SSE."""
    return sse_frame(name, orjson.dumps(payload), cursor)


# WebSocket -----------------------------------------------------------------------------

def ws_message(kind: str, **fields: Any) -> str:
    """A server → client WebSocket message ``{"type": kind, ...}`` as JSON text."""
    return orjson.dumps({"type": kind, **fields}).decode()


# WebSocket close codes (4000-4999 are the application's). Codes below say whether and how to come back.
WS_CLOSE_SHUTDOWN = 4001  # this process is going away: reconnect (elsewhere) with your cursors
WS_CLOSE_TOKEN_EXPIRED = 4003  # a token that opened a subscription expired: get a fresh one, resume with your cursors
WS_CLOSE_SLOW = 4008  # you fell too far behind: reconnect with your cursors, nothing is lost
WS_CLOSE_UNAUTHORIZED = 4401  # no valid token: get a new one before reconnecting
WS_CLOSE_POLICY = 1008  # a message broke the protocol or a limit: fix the client
WS_CLOSE_TOO_BIG = 1009  # a message was larger than HERALD_MAX_WS_MESSAGE
WS_CLOSE_UNSUPPORTED = 1003  # binary messages are not part of the protocol


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """One parsed client → server WebSocket message."""

    type: str
    topic: str | None = None
    cursor: str | None = None
    token: str | None = None
    id: Any = None
    command: dict[str, Any] | None = None


_CLIENT_TYPES = frozenset({"subscribe", "unsubscribe", "ping", "command"})


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    """Validate a client message; raises :class:`ProtocolError` with a reason to send back."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("message is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ProtocolError("message must be a JSON object")
    kind = doc.get("type")
    if kind not in _CLIENT_TYPES:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}; expected one of {sorted(_CLIENT_TYPES)}")
    ref = doc.get("id")
    if ref is not None and not isinstance(ref, (str, int)):
        raise ProtocolError("'id' must be a string or an integer")
    if kind == "ping":
        return ClientFrame(type="ping", id=ref)
    if kind == "command":
        for name in ("method", "path"):
            if not isinstance(doc.get(name), str):
                raise ProtocolError(f"a command needs '{name}' as a string")
        headers = doc.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ProtocolError("'headers' must be an object of strings")
        return ClientFrame(
            type="command",
            id=ref,
            command={"method": doc["method"], "path": doc["path"], "body": doc.get("body"), "headers": headers},
        )
    topic = doc.get("topic")
    if not isinstance(topic, str):
        raise ProtocolError(f"'{kind}' needs a 'topic' string")
    validate_topic(topic)
    cursor = doc.get("cursor")
    if cursor is not None:
        if not isinstance(cursor, str):
            raise ProtocolError("'cursor' must be a string")
        parse_cursor(cursor)
    token = doc.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("'token' must be a string")
    return ClientFrame(type=kind, topic=topic, cursor=cursor, token=token, id=ref)


# Frames --------------------------------------------------------------------------------

class Frame:
    """One event on one topic at one cursor, framed lazily once per transport and then shared."""

    __slots__ = ("_sse", "_sse_tail", "_ws", "_ws_frame", "cursor", "encoded", "epoch", "key", "terminal", "topic",
                 "type")

    def __init__(self, topic: str, cursor: str, type: str, encoded: bytes, *, terminal: bool = False) -> None:
        self.topic = topic
        self.cursor = cursor
        self.key, self.epoch = split_cursor(cursor)
        self.type = type
        self.encoded = encoded
        self.terminal = terminal
        self._sse: bytes | None = None
        self._sse_tail: bytes | None = None
        self._ws: str | None = None
        self._ws_frame: bytes | None = None

    @classmethod
    def from_event(cls, topic: str, cursor: str, event: Event) -> Frame:
        """The frame of a decoded event."""
        return cls(topic, cursor, event.type, event.encoded, terminal=is_terminal_type(event.type))

    @property
    def sse(self) -> bytes:
        """The whole SSE message with ``id:`` set to this topic's cursor."""
        if self._sse is None:
            self._sse = b"id: " + self.cursor.encode() + b"\n" + self.sse_tail
        return self._sse

    @property
    def sse_tail(self) -> bytes:
        """The SSE message without its ``id:`` line, for streams whose id is a vector cursor."""
        if self._sse_tail is None:
            self._sse_tail = sse_frame(self.type, self.encoded)
        return self._sse_tail

    @property
    def ws(self) -> str:
        """The WebSocket ``event`` message (text), with the event's JSON spliced in, not re-encoded."""
        if self._ws is None:
            self._ws = (
                b'{"type":"event","topic":'
                + orjson.dumps(self.topic)
                + b',"cursor":"'
                + self.cursor.encode()
                + b'","event":'
                + self.encoded
                + b"}"
            ).decode()
        return self._ws

    @property
    def ws_frame(self) -> bytes:
        """:attr:`ws` as a whole server-to-client WebSocket frame (unmasked, so the same bytes for every socket)."""
        if self._ws_frame is None:
            self._ws_frame = ws_text_frame(self.ws.encode())
        return self._ws_frame


def ws_text_frame(payload: bytes) -> bytes:
    """One final text frame carrying ``payload``, as a server sends it (RFC 6455 §5.2: no mask)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = b"\x81\x7e" + size.to_bytes(2, "big")
    else:
        head = b"\x81\x7f" + size.to_bytes(8, "big")
    return head + payload


# Operation lifecycle event types, published on ``operations/{id}`` by status changes.
STATUS_EVENT_PREFIX = "herald.operation."
TERMINAL_EVENT_TYPES = frozenset(
    STATUS_EVENT_PREFIX + s for s in ("succeeded", "failed", "canceled")
)


def is_terminal_type(event_type: str) -> bool:
    """Whether an event of this type ends its operation's stream."""
    return event_type in TERMINAL_EVENT_TYPES
