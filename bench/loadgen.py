"""The load generator: raw-socket SSE and WebSocket subscribers and a keep-alive HTTP client.

Light enough not to be the bottleneck: each subscriber is an :class:`asyncio.Protocol` whose
``data_received`` only stamps the arrival time (``time.time_ns``, the clock the publisher
stamps events with) and keeps the bytes; HTTP chunking, SSE and JSON are parsed after the
measurement window (:func:`sse_messages`, :func:`ws_messages`). The WebSocket subscriber finds
frame boundaries as they come, since it must answer pings, but decodes nothing until later.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

HTTP_OK = b" 200 "
WS_KEY = base64.b64encode(b"herald-bench-key").decode()


class Group:
    """Subscribers opened together: counts of connected, failed and closed ones, awaitable."""

    def __init__(self) -> None:
        self.connected = 0
        self.failed = 0
        self.closed = 0
        self.last_rx = 0  # time.time_ns() of the last bytes any subscriber received
        self.errors: dict[str, int] = {}
        self.samples: list[str] = []  # the first bytes of a few refusals, to tell why
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def fail(self, reason: str) -> None:
        """Count a subscriber that could not connect."""
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def on_connected(self) -> None:
        """Count a subscriber that is ready (status 200 or 101 seen) and wake whoever waits."""
        self.connected += 1
        if self._waiters:
            for n, fut in self._waiters:
                if self.connected >= n and not fut.done():
                    fut.set_result(None)

    async def wait_connected(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` subscribers are ready; ``False`` on timeout."""
        if self.connected >= n:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.remove((n, fut))


class Subscriber(asyncio.Protocol):
    """Base of the raw subscribers: keeps ``(arrival_ns, bytes)`` chunks and signals readiness."""

    def __init__(self, request: bytes, group: Group) -> None:
        self.request = request
        self.group = group
        self.chunks: list[tuple[int, bytes]] = []
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.ready_at = 0
        self.lost_at = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self.transport.write(self.request)

    def _set_ready(self, ok: bool, reason: str = "") -> None:
        if self.ready.done():
            return
        self.ready.set_result(ok)
        if ok:
            self.ready_at = time.time_ns()
            self.group.on_connected()
        else:
            self.group.fail(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_at = time.time_ns()
        self.group.closed += 1
        self._set_ready(False, "closed before ready")

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.abort()


class SSESubscriber(Subscriber):
    """One raw SSE stream: ready when the response's status line says 200."""

    def data_received(self, data: bytes) -> None:
        now = self.group.last_rx = time.time_ns()
        self.chunks.append((now, data))
        if not self.ready.done():
            if data[8:13] == HTTP_OK:
                self._set_ready(True)
            else:
                self._set_ready(False, "status " + data[9:12].decode(errors="replace"))
                if len(self.group.samples) < 3:
                    self.group.samples.append(data[-300:].decode(errors="replace"))
                self.close()


class WSSubscriber(Subscriber):
    """One raw WebSocket: frames are split as they arrive (pings answered), decoded later.

    ``ready_on_message`` waits for the first text message (Herald's ``subscribed``) rather than
    the ``101`` handshake.
    """

    def __init__(self, request: bytes, group: Group, *, ready_on_message: bool) -> None:
        super().__init__(request, group)
        self.ready_on_message = ready_on_message
        self.frames: list[tuple[int, int, bytes]] = []
        self._buf = b""
        self._upgraded = False
        self._partial: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        now = self.group.last_rx = time.time_ns()
        buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            if buf[8:13] != b" 101 ":
                self._set_ready(False, "status " + buf[9:12].decode(errors="replace"))
                self.close()
                return
            self._upgraded = True
            if not self.ready_on_message:
                self._set_ready(True)
            buf = buf[end + 4:]
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if size - pos < head + length:
                break
            payload = buf[pos + head:pos + head + length]
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._send(0xA, payload)
            elif opcode in (0x0, 0x1, 0x2):
                self._partial.append(payload)
                if b0 & 0x80:
                    message = b"".join(self._partial) if len(self._partial) > 1 else payload
                    self._partial.clear()
                    self.frames.append((now, opcode or 0x1, message))
                    if not self.ready.done():
                        self._set_ready(True)
            elif opcode == 0x8:
                self.frames.append((now, 0x8, payload))
        self._buf = buf[pos:]

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        else:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(head + mask + masked)

    def send_text(self, text: str) -> None:
        """Send a text message (masked, as a client must)."""
        self._send(0x1, text.encode())


def sse_request(path: str, host: str) -> bytes:
    """The GET that opens an SSE stream."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n").encode()


def ws_request(path: str, host: str) -> bytes:
    """The GET that opens a WebSocket."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


@dataclass
class OpenResult:
    """How opening a group of subscribers went."""

    subscribers: list[Subscriber]
    group: Group
    seconds: float
    started_ns: int

    @property
    def connected(self) -> int:
        """How many are ready."""
        return self.group.connected

    @property
    def failed(self) -> int:
        """How many failed to connect."""
        return self.group.failed


async def open_subscribers(
    host: str,
    port: int,
    factories: Sequence[Callable[[Group], Subscriber]],
    *,
    concurrency: int = 256,
    timeout: float = 30.0,
    deadline: float = 120.0,
) -> OpenResult:
    """Open every subscriber, at most ``concurrency`` handshakes at a time; bounded by ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    group = Group()
    subs: list[Subscriber] = []
    sem = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + deadline

    async def one(factory: Callable[[Group], Subscriber]) -> None:
        async with sem:
            if time.monotonic() > stop_at:
                group.fail("deadline")
                return
            try:
                _, proto = await asyncio.wait_for(loop.create_connection(lambda: factory(group), host, port), timeout)
            except (OSError, TimeoutError) as exc:
                group.fail(type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) else ""))
                return
            subs.append(proto)
            try:
                await asyncio.wait_for(asyncio.shield(proto.ready), timeout)
            except TimeoutError:
                group.fail("no response")
                proto.close()

    start = time.monotonic()
    started_ns = time.time_ns()
    await asyncio.gather(*(one(f) for f in factories))
    return OpenResult(subs, group, time.monotonic() - start, started_ns)


def close_all(subs: Iterable[Subscriber]) -> None:
    """Abort every subscriber's connection."""
    for sub in subs:
        sub.close()


# Parsing after the window ------------------------------------------------------------------

class _BodyDecoder:
    """HTTP/1.1 response bytes → body bytes (identity or chunked), fed piece by piece."""

    def __init__(self) -> None:
        self.buf = b""
        self.headers_done = False
        self.chunked = False
        self.remaining = 0  # bytes left in the current chunk
        self.status = 0

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data
        if not self.headers_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return b""
            head = buf[:end].lower()
            self.status = int(head[9:12] or 0)
            self.chunked = b"transfer-encoding: chunked" in head
            self.headers_done = True
            buf = buf[end + 4:]
        if not self.chunked:
            self.buf = b""
            return buf
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            if self.remaining > 0:
                take = min(self.remaining, len(buf) - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.remaining = -2  # the CRLF after the chunk
                continue
            if self.remaining < 0:
                skip = min(-self.remaining, len(buf) - pos)
                pos += skip
                self.remaining += skip
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                pos = len(buf)
                break
            self.remaining = size
        self.buf = buf[pos:]
        return b"".join(out)


@dataclass(slots=True)
class Message:
    """One event received by a subscriber: arrival time, SSE fields or WS text, and its JSON."""

    arrived_ns: int
    event: str
    id: str | None
    data: bytes

    def json(self) -> Any:
        """The data decoded."""
        return orjson.loads(self.data)


def sse_messages(chunks: Iterable[tuple[int, bytes]]) -> tuple[int, list[Message]]:
    """Every SSE message (not comments or ``retry:``) with the arrival time of its last byte."""
    decoder = _BodyDecoder()
    pending = b""
    out: list[Message] = []
    for t, data in chunks:
        body = decoder.feed(data)
        if not body:
            continue
        pending += body
        pending = pending.replace(b"\r\n", b"\n")
        while True:
            end = pending.find(b"\n\n")
            if end < 0:
                break
            block = pending[:end]
            pending = pending[end + 2:]
            event = "message"
            ident: str | None = None
            data_lines: list[bytes] = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data_lines.append(line[5:].removeprefix(b" "))
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                elif line.startswith(b"id:"):
                    ident = line[3:].strip().decode()
            if data_lines:
                out.append(Message(t, event, ident, b"\n".join(data_lines)))
    return decoder.status, out


def ws_messages(frames: Iterable[tuple[int, int, bytes]]) -> list[Message]:
    """Every text message of a WebSocket subscriber."""
    return [Message(t, "message", None, payload) for t, opcode, payload in frames if opcode == 0x1]


def envelope(doc: Any) -> dict[str, Any] | None:
    """The CloudEvents envelope in a decoded message (Herald's WS wraps it in ``{"type":"event"}``)."""
    if not isinstance(doc, dict):
        return None
    if doc.get("type") == "event" and isinstance(doc.get("event"), dict):
        inner: dict[str, Any] = doc["event"]
        return inner
    if "specversion" in doc:
        return doc
    return None


# HTTP client ------------------------------------------------------------------------------------

def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line[15:])
    return 0


class _HTTPConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.buf = b""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        length = _content_length(head)
        if len(self.buf) - end - 4 >= length:
            body = self.buf[end + 4:end + 4 + length]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))


@dataclass
class HTTPPool:
    """Keep-alive HTTP/1.1 connections to one server, one request in flight on each."""

    host: str
    port: int
    size: int = 32
    _idle: asyncio.Queue[_HTTPConn] = field(default_factory=asyncio.Queue)
    _all: list[_HTTPConn] = field(default_factory=list)

    async def start(self) -> HTTPPool:
        """Open the connections."""
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            _, conn = await loop.create_connection(_HTTPConn, self.host, self.port)
            self._all.append(conn)
            self._idle.put_nowait(conn)
        return self

    async def post(self, path: str, body: bytes, *, content_type: str = "application/json",
                   headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """POST (with ``headers`` besides Host, Content-Type and Content-Length) and return ``(status, body)``."""
        conn = await self._idle.get()
        try:
            if conn.lost:
                _, conn = await asyncio.get_running_loop().create_connection(_HTTPConn, self.host, self.port)
                self._all.append(conn)
            extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
            raw = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                   f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
            return await asyncio.wait_for(conn.request(raw), timeout)
        except BaseException:
            conn.lost = True
            if conn.transport is not None:
                conn.transport.abort()
            raise
        finally:
            self._idle.put_nowait(conn)

    def close(self) -> None:
        """Close every connection."""
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.abort()


# Statistics -----------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of already sorted values, nearest rank; ``None`` if empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of latencies in milliseconds."""
    values = sorted(latencies_ms)
    return {
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
        "max_ms": values[-1] if values else None,
    }
