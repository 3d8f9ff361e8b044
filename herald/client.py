"""A small blocking HTTP and Server-Sent Events client on the standard library, for ``herald submit`` and ``tail``.

:class:`SSEParser` is Sans-I/O: bytes in, :class:`Message` s out, the last event id kept as an
``EventSource`` keeps it (an ``id:``-only block moves it without dispatching anything).
:func:`request` is one HTTP exchange; :func:`follow` reads a stream across dropped connections,
reconnecting with ``Last-Event-ID`` after a bounded backoff, as a browser's ``EventSource`` does.

Errors: :class:`StreamRefused` when the server answers a stream with something other than ``200``
(a ``4xx`` is final; ``5xx`` is retried by :func:`follow`); ``OSError`` and
``http.client.HTTPException`` for a connection that failed or broke.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

# Timeouts
CONNECT_TIMEOUT = 10.0
"""Seconds to connect and to wait for the answer to a plain request."""
IDLE_TIMEOUT = 60.0
"""Seconds a stream may stay silent before it counts as dropped (Herald sends a heartbeat every 15 s)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One dispatched SSE message: its ``event`` name (``message`` when unnamed), ``data`` and ``id``."""

    event: str
    data: str
    id: str | None
    """The last event id after this message (its own ``id:``, or the one before it)."""

    def json(self) -> Any:
        """The data decoded as JSON."""
        return orjson.loads(self.data)


@dataclass(slots=True)
class SSEParser:
    """Incremental SSE parser (the WHATWG rules): feed bytes, get the messages they completed."""

    last_event_id: str | None = None
    """What a reconnect sends as ``Last-Event-ID``: the id of the last block dispatched."""
    retry_ms: int | None = None
    """The server's last ``retry:`` advice."""
    _buffer: bytes = b""
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, chunk: bytes) -> list[Message]:
        """Parse ``chunk``; the messages it completed, in order."""
        self._buffer += chunk
        out: list[Message] = []
        while True:
            cut = _line_end(self._buffer)
            if cut < 0:
                return out
            raw, self._buffer = self._buffer[:cut], self._buffer[cut:]
            self._buffer = self._buffer[2:] if self._buffer.startswith(b"\r\n") else self._buffer[1:]
            message = self._line(raw.decode("utf-8", errors="replace"))
            if message is not None:
                out.append(message)

    def _line(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: Herald's heartbeat
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Message | None:
        if self._id is not None:
            self.last_event_id = self._id or None  # an empty id resets it
        data, event = self._data, self._event
        self._data, self._event, self._id = [], "", None
        if not data:
            return None  # nothing to dispatch (an id-only block still moved the last event id)
        return Message(event or "message", "\n".join(data), self.last_event_id)


def _line_end(buffer: bytes) -> int:
    """The index of the first line break in ``buffer`` (``\\n``, ``\\r\\n`` or ``\\r``); -1 if none is complete."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr < 0:
        return lf
    if cr == len(buffer) - 1:
        return lf if 0 <= lf < cr else -1  # a trailing \r may be the first half of \r\n
    return cr if lf < 0 or cr < lf else lf


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (``None`` when it is empty or not JSON)."""
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None


class StreamRefused(Exception):
    """The server answered a stream request with ``reply`` instead of ``200 text/event-stream``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"HTTP {reply.status}")
        self.reply = reply


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to ``url``'s origin, and the request target (path and query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return kind(parts.hostname, parts.port, timeout=timeout), target


def request(method: str, url: str, *, headers: Mapping[str, str] | None = None, body: bytes | None = None,
            timeout: float = CONNECT_TIMEOUT) -> Reply:
    """One HTTP exchange; redirects are answers, not followed."""
    conn, target = _connect(url, timeout)
    try:
        conn.request(method, target, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def open_stream(url: str, parser: SSEParser, *, headers: Mapping[str, str] | None = None,
                idle_timeout: float = IDLE_TIMEOUT) -> Iterator[Message]:
    """The messages of one connection to ``url``, resuming after ``parser.last_event_id``; ends when it does.

    :class:`StreamRefused` for any answer but ``200``.
    """
    conn, target = _connect(url, CONNECT_TIMEOUT)
    try:
        sent = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})}
        if parser.last_event_id is not None:
            sent["Last-Event-ID"] = parser.last_event_id
        conn.request("GET", target, headers=sent)
        response = conn.getresponse()
        if response.status != 200:
            raise StreamRefused(Reply(response.status, dict(response.getheaders()), response.read()))
        if conn.sock is not None:
            conn.sock.settimeout(idle_timeout)
        while chunk := response.read1(65536):
            yield from parser.feed(chunk)
    finally:
        conn.close()


@dataclass(slots=True)
class Backoff:
    """Delays between reconnects: doubling from ``initial`` up to ``cap`` seconds, reset by a good connection."""

    initial: float = 0.1
    cap: float = 2.0
    _next: float = 0.0

    def delay(self) -> float:
        """The next delay (and double the one after)."""
        current = self._next or self.initial
        self._next = min(current * 2, self.cap)
        return current

    def reset(self) -> None:
        """A connection worked: start again from ``initial``."""
        self._next = 0.0


def follow(url: str, *, headers: Mapping[str, str] | None = None, cursor: str | None = None,
           on_drop: Callable[[str, float], None] | None = None, backoff: Backoff | None = None,
           idle_timeout: float = IDLE_TIMEOUT, refresh: Callable[[], str] | None = None) -> Iterator[Message]:
    """Every message of the stream at ``url`` from after ``cursor``, across dropped connections.

    A connection that breaks, ends, times out or is answered ``5xx`` is opened again after a
    bounded backoff with ``Last-Event-ID``: the last id seen. ``on_drop(reason, delay)`` hears of
    each. Ends when the server answers ``204`` (nothing more will come); a ``4xx`` raises
    :class:`StreamRefused`, except a ``401`` when ``refresh`` is given: the subscribe token in
    ``url`` expired (the server ends a stream when its token does), so ``refresh()`` gives a
    fresh URL and the stream resumes from the same cursor — once per connection that got
    anywhere, so a refresh that does not help still ends in the ``401``.
    """
    parser = SSEParser(last_event_id=cursor)
    backoff = backoff or Backoff()
    refreshed = False
    while True:
        try:
            for message in open_stream(url, parser, headers=headers, idle_timeout=idle_timeout):
                backoff.reset()
                refreshed = False
                yield message
            reason = "the server ended the stream"
        except StreamRefused as exc:
            if exc.reply.status == 204:
                return
            if exc.reply.status == 401 and refresh is not None and not refreshed:
                url, refreshed = refresh(), True
                continue
            if exc.reply.status < 500:
                raise
            reason = f"HTTP {exc.reply.status}"
        except (OSError, http.client.HTTPException) as exc:
            reason = str(exc) or type(exc).__name__
        delay = backoff.delay()
        if on_drop is not None:
            on_drop(reason, delay)
        time.sleep(delay)
