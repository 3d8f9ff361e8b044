"""Push endpoints: Server-Sent Events and the WebSocket.

Each connection is one :class:`~herald.hub.Subscriber` and one coroutine that writes what
the hub queues for it: pre-framed bytes, batched into one write when several are
waiting. SSE also has to notice the client going away (uvicorn's ``send`` stays silent after a
disconnect): :class:`DisconnectWatch` under Herald's uvicorn protocol, one small task elsewhere;
the WebSocket's reader does it for a socket.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote, urlsplit

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from herald.auth import Grant, TokenError
from herald.broker.base import BrokerError, HistoryPage
from herald.http.admission import Seat, token_key
from herald.http.commands import parse_prefer, submit
from herald.http.fastwrite import ChunkWriter, FrameWriter, take_chunk_writer, take_frame_writer
from herald.http.gateway import Gateway, query_value, query_values, request_header
from herald.http.limits import client_of
from herald.http.problems import HTTPProblem, problem_response
from herald.hub import HEARTBEAT, Gap, Subscriber
from herald.operations import Operation, operation_topic
from herald.protocol import (
    SSE_HEADERS,
    SSE_HEARTBEAT,
    WS_CLOSE_POLICY,
    WS_CLOSE_SHUTDOWN,
    WS_CLOSE_SLOW,
    WS_CLOSE_TOKEN_EXPIRED,
    WS_CLOSE_TOO_BIG,
    WS_CLOSE_UNAUTHORIZED,
    WS_CLOSE_UNSUPPORTED,
    Frame,
    ProtocolError,
    format_vector_cursor,
    parse_client_frame,
    parse_cursor,
    parse_vector_cursor,
    sse_control,
    sse_retry,
    validate_topic,
    ws_message,
)
from herald.settings import Settings

log = logging.getLogger("herald.push")

RECONNECT_REASONS = {
    "slow-consumer": "fell behind; reconnect with your cursor and nothing is lost",
    "shutdown": "this gateway process is stopping; reconnect (to another) with your cursor",
    "token-expired": "the subscribe token expired; fetch fresh URLs and reconnect with the cursor",
}
_RECONNECT_CODES = {"slow-consumer": WS_CLOSE_SLOW, "shutdown": WS_CLOSE_SHUTDOWN,
                    "token-expired": WS_CLOSE_TOKEN_EXPIRED}
"""The WebSocket close code of each of the :data:`RECONNECT_REASONS`."""
GAP_DETAIL = "events after your cursor are no longer kept; some were missed"


def _gap_fields(gap: Gap) -> dict[str, str | None]:
    """The body of an SSE ``herald.gap`` / WebSocket ``gap`` message for events lost while following."""
    return {"topic": gap.topic, "cursor": gap.cursor, "oldest": gap.oldest, "detail": GAP_DETAIL}


def _token(conn: HTTPConnection) -> str | None:
    return query_value(conn.scope, "token") or conn.cookies.get("herald_token")


def admit(gateway: Gateway, conn: HTTPConnection, token: str | None) -> Seat:
    """Count a new push connection opened with ``token`` against its caps (:mod:`herald.http.admission`).

    Refused: ``503`` while this process stops or when it is full (another may have room), ``429``
    when the client or the token holds its share already; with ``Retry-After``, and counted in
    ``herald_limited_total``. The caller gives the seat back when the connection ends.
    """
    if not gateway.accepting:
        raise HTTPProblem(503, "this gateway is shutting down; connect to another", kind="shutting-down",
                          headers={"Retry-After": "1"})
    admission = gateway.admission
    client = client_of(conn, conn.scope.get("herald.subject"))
    key = token_key(token)
    reason = admission.refusal(gateway.settings, client, key)
    if reason is None:
        return admission.admit(client, key)
    if gateway.metrics is not None:
        gateway.metrics.limited(reason)
    if reason == "connections-process":
        raise HTTPProblem(503, "this gateway holds as many connections as it is allowed",
                          kind="too-many-connections", headers={"Retry-After": "5"})
    whose = "this client" if reason == "connections-client" else "this subscribe token"
    raise HTTPProblem(429, f"{whose} holds as many push connections as it is allowed; close one first",
                      kind="too-many-connections", headers={"Retry-After": "5"})


def _origin_allowed(ws: HTTPConnection, settings: Settings) -> bool:
    """Whether the handshake's ``Origin`` may open a socket: none, the gateway's own, or a listed one.

    A browser always sends ``Origin`` (and the ``herald_token`` cookie) with a WebSocket handshake,
    whatever page opened it, and the WebSocket has no CORS of its own: this check is what stops a
    page of another site from opening ``/ws`` in its visitor's name. A handshake without ``Origin``
    is no browser's (curl, a server, the ``websockets`` library) and carries its own credentials.
    """
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    seen = _origin_of(origin)
    if seen is None:
        return False  # "null" (a sandboxed frame, a file) or no origin at all
    # the page's own origin: the host this request was sent to, https for wss and http for ws
    scheme = "https" if ws.url.scheme == "wss" else "http"
    allowed = {_origin_of(f"{scheme}://{ws.headers.get('host', '')}"), *map(_origin_of, settings.cors_origins)}
    if settings.public_url:
        allowed.add(_origin_of(settings.public_url))
    return seen in allowed


def _origin_of(url: str) -> str | None:
    """The ``scheme://host[:port]`` of ``url``, lowercase and without its scheme's default port."""
    try:
        parts = urlsplit(url.lower())
        port = parts.port
    except ValueError:  # a port that is not a number
        return None
    if not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != {"http": 80, "https": 443}.get(parts.scheme):
        host += f":{port}"
    return f"{parts.scheme}://{host}"


def _grant(gateway: Gateway, token: str | None, topics: list[str], caller: str | None) -> Grant:
    """The grant opening ``topics`` (the domains' topic rules; a token for the rest); TokenError otherwise."""
    if gateway.access is None:
        return gateway.signer.check(token, topics)
    return gateway.access.check(token, topics, caller)


def _authorize(gateway: Gateway, conn: HTTPConnection, topics: list[str]) -> Grant:
    try:
        return _grant(gateway, _token(conn), topics, conn.scope.get("herald.subject"))
    except TokenError as exc:
        raise HTTPProblem(exc.status, exc.detail, kind="invalid-token" if exc.status == 401 else "forbidden-topic",
                          headers={"WWW-Authenticate": 'Bearer realm="herald"'} if exc.status == 401 else None
                          ) from exc


def _owner_allows(op: Operation, grant: Grant, caller: str | None) -> bool:
    """Whether a subscriber may follow ``op``: its token was issued to the owner, and so is its bearer, if any."""
    return op.owner is None or (grant.subject == op.owner and caller in (None, op.owner))


async def _check_owners(gateway: Gateway, conn: HTTPConnection, topics: list[str], grant: Grant) -> None:
    """403 when one of ``topics`` is an operation that belongs to someone else."""
    for topic in topics:
        if not topic.startswith("operations/"):
            continue
        try:
            op = await gateway.broker.get_operation(topic.removeprefix("operations/"))
        except BrokerError as exc:
            raise HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                              headers={"Retry-After": "2"}) from exc
        if op is not None and not _owner_allows(op, grant, conn.scope.get("herald.subject")):
            raise HTTPProblem(403, f"{topic!r} belongs to someone else", kind="forbidden-topic")


# SSE ---------------------------------------------------------------------------------

class EventStream(Response):
    """An SSE response that follows topics through the hub until the client leaves."""

    def __init__(self, gateway: Gateway, topics: list[str], cursors: list[str | None], *, end_on_terminal: bool,
                 expires_at: int = 0, seat: Seat | None = None):
        # no Response.__init__: a stream has no body or fixed headers to prepare, and lives as long as its client
        self.background = None
        self.gateway = gateway
        self.topics = topics
        self.cursors = cursors
        self.end_on_terminal = end_on_terminal
        self.expires_at = expires_at
        """When the token that opened the stream expires, ending it (Unix seconds; 0: opened without one)."""
        self.seat = seat
        """Its place in the connection caps (:func:`admit`), given back when the stream ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Follow the topics, then stream until the client, the hub or a terminal event ends it."""
        gateway = self.gateway
        hub = gateway.hub
        sub = Subscriber(gateway.settings.queue_size, "sse")
        vector = len(self.topics) > 1
        positions = list(self.cursors)
        preamble = [sse_retry(gateway.settings.retry_ms)]
        try:
            for i, topic in enumerate(self.topics):
                # no local name for the announcer: a closure left in this frame would live as long as the stream
                await hub.follow(sub, topic, self.cursors[i], from_start=topic.startswith("operations/"),
                                 announce=self._announcer(i, topic, positions, preamble))
        except BrokerError:
            await hub.leave(sub)
            self._release()
            await problem_response(HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                                               headers={"Retry-After": "2"}))(scope, receive, send)
            return
        except BaseException:
            self._release()
            raise
        if any(c is None and not t.startswith("operations/") for c, t in zip(self.cursors, self.topics, strict=True)):
            # A stream that starts live names its starting cursor at once (an id-only block sets an
            # EventSource's lastEventId without dispatching), so a reconnect before the first event
            # resumes from here instead of starting live again and missing what came meanwhile.
            start = format_vector_cursor(positions) if vector else positions[0]
            preamble.append(b"id: " + (start or "0-0").encode() + b"\n\n")
        hub.expire_at(sub, self.expires_at)
        sub.task = asyncio.current_task()
        # Herald's uvicorn protocol only (herald/http/fastwrite.py), reached through no middleware that
        # stands in for the connection; anything else is plain ASGI: frames through send, a watch task
        write = take_chunk_writer(scope)
        if write is not None and not write.serves(receive):
            write = None
        watcher = DisconnectWatch(receive, sub) if write is not None else _watch_task(receive, sub)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"".join(preamble), "more_body": True})
            # the loop lives in this frame: a coroutine of its own would be one more frame per idle stream
            index = {t: i for i, t in enumerate(self.topics)} if vector else {}
            if write is not None and not vector:
                sub.direct = _DirectWrite(write, positions, self.end_on_terminal)
            while True:
                batch = await sub.next_batch()
                if not batch:
                    if sub.reason in RECONNECT_REASONS:
                        last = format_vector_cursor(positions) if vector else positions[0]
                        await send({"type": "http.response.body", "more_body": True, "body": sse_control(
                            "herald.disconnect",
                            {"reason": sub.reason, "detail": RECONNECT_REASONS[sub.reason], "reconnect": True,
                             "cursor": last},
                        )})
                    break
                body, ended = self._encode(batch, vector, positions, index)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                if ended:
                    break
        except asyncio.CancelledError:
            if sub.reason != "slow-consumer":
                raise
            log.info("cut off a slow SSE client", extra={"event": "push.slow_consumer"})
            return
        finally:
            sub.direct = None
            watcher.cancel()
            self._release()
            await hub.leave(sub)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _release(self) -> None:
        if self.seat is not None:
            self.gateway.admission.release(self.seat)
            self.seat = None

    def _announcer(self, i: int, topic: str, positions: list[str | None],
                   preamble: list[bytes]) -> Callable[[str | None, HistoryPage | None], None]:
        def announce(start: str | None, page: HistoryPage | None) -> None:
            if positions[i] is None:
                # An empty topic has no cursor yet: "0-0" (before its first event) keeps the slot
                # filled, so a resume replays what it got meanwhile instead of starting live.
                positions[i] = start if start is not None else "0-0"
            if page is not None and page.truncated:
                mark = None
                if page.reset:
                    # The cursor's history was lost: the stream now stands before the first event kept, and
                    # says so (the gap's id), so a resume from here does not report the same loss again.
                    positions[i] = "0-0"
                    mark = format_vector_cursor(positions) if len(positions) > 1 else "0-0"
                preamble.append(sse_control("herald.gap", {
                    "topic": topic, "cursor": self.cursors[i], "oldest": page.oldest, "detail": GAP_DETAIL,
                }, mark))

        return announce

    def _encode(self, batch: list[object], vector: bool, positions: list[str | None],
                index: dict[str, int]) -> tuple[bytes, bool]:
        """A batch as one SSE write, and whether it holds the terminal event that ends the stream."""
        parts: list[bytes] = []
        for item in batch:
            if item is HEARTBEAT:
                parts.append(SSE_HEARTBEAT)
                continue
            if isinstance(item, Gap):
                parts.append(sse_control("herald.gap", _gap_fields(item)))
                continue
            assert isinstance(item, Frame)
            if vector:
                positions[index[item.topic]] = item.cursor
                parts.append(b"id: " + format_vector_cursor(positions).encode() + b"\n" + item.sse_tail)
            else:
                positions[0] = item.cursor
                parts.append(item.sse)
            if item.terminal and self.end_on_terminal:
                return b"".join(parts), True
        return b"".join(parts), False


class _DirectFrame:
    """The hub's direct write for a socket: a frame as one whole WebSocket message."""

    __slots__ = ("write",)

    def __init__(self, write: FrameWriter) -> None:
        self.write = write

    def __call__(self, frame: Frame) -> bool:
        return self.write(frame.ws_frame)


class _DirectWrite:
    """The hub's direct write for a single-topic stream: a frame as one chunk, its cursor noted as sent."""

    __slots__ = ("end_on_terminal", "positions", "write")

    def __init__(self, write: ChunkWriter, positions: list[str | None], end_on_terminal: bool) -> None:
        self.write = write
        self.positions = positions
        self.end_on_terminal = end_on_terminal

    def __call__(self, frame: Frame) -> bool:
        if frame.terminal and self.end_on_terminal:
            return False  # the stream's coroutine writes it and ends the stream
        if not self.write(frame.sse):
            return False
        self.positions[0] = frame.cursor
        return True


_NO_CONTEXT = contextvars.Context()  # the watch reads no context variable: no copy of the caller's per connection


class DisconnectWatch:
    """Closes ``sub`` with ``client-gone`` when ``receive()`` says ``http.disconnect``, without a task.

    An SSE stream has to notice its client leaving (uvicorn's ``send`` stays silent after a
    disconnect), and a task per connection just to wait on ``receive()`` costs memory and a
    scheduling round per connection. Instead the ``receive()`` coroutine is stepped by hand, the
    way a task would step it: each future it waits on gets a done callback that steps it again.
    Only for a ``receive`` that Herald's uvicorn protocol vouches for (``ChunkWriter.serves``);
    any other gets :func:`_watch_task`, as it may depend on the task that runs it: a
    ``BaseHTTPMiddleware``'s ``receive`` opens an anyio task group, whose cancel scope belongs to
    whichever task steps it first, and stepped from the stream's task it cancelled the stream
    before its response started (a 500, "No response returned").
    """

    __slots__ = ("_coro", "_receive", "_sub")

    def __init__(self, receive: Receive, sub: Subscriber) -> None:
        self._receive = receive
        self._sub = sub
        self._coro: Coroutine[Any, Any, Message] | None = None
        self._next()

    def _next(self) -> None:
        self._coro = self._receive()  # type: ignore[assignment]  # Receive is typed as an awaitable
        self._step(None)

    def _step(self, _: object) -> None:
        coro = self._coro
        if coro is None:
            return
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            self._coro = None
            if self._got(done.value):
                self._next()
            return
        except (Exception, asyncio.CancelledError):  # a receive that fails: the connection is gone
            self._coro = None
            self._sub.close("client-gone")
            return
        if waiting is None:  # a bare yield (sleep(0)): step again on the next loop iteration
            asyncio.get_running_loop().call_soon(self._step, None)
        else:  # a future, as a task would get it
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(self._step, context=_NO_CONTEXT)

    def _got(self, message: Message) -> bool:
        """Take one message ``receive()`` answered; whether to ask it for the next one now."""
        if message["type"] == "http.disconnect":
            self._sub.close("client-gone")
            return False
        return True  # the (empty) request body; the next message is the disconnect

    def cancel(self) -> None:
        """Stop watching (the stream is over)."""
        coro, self._coro = self._coro, None
        if coro is not None:
            coro.close()


class SocketWatch(DisconnectWatch):
    """A socket's reader without a task: :class:`DisconnectWatch`'s stepping, each message to its session.

    An idle socket then holds no task of its own (1 KiB). A message that needs awaiting (a
    subscribe reads the broker) runs in a short task, and the next one is asked for only after it,
    as the reading loop did: uvicorn stops reading a socket whose last message nobody took.
    """

    __slots__ = ("_session",)

    def __init__(self, receive: Receive, session: SocketSession) -> None:
        self._session = session
        super().__init__(receive, session.sub)

    def _got(self, message: Message) -> bool:
        return self._session.got(message, self)

    def resume(self) -> None:
        """Ask ``receive()`` for the next message (after a message that was awaited)."""
        if self._coro is None and not self._sub.closed:
            self._next()


def _watch_task(receive: Receive, sub: Subscriber) -> asyncio.Task[None]:
    """What :class:`DisconnectWatch` does, for any ``receive``: a task that awaits it (``cancel()`` stops it)."""
    return asyncio.ensure_future(_await_disconnect(receive, sub))


async def _await_disconnect(receive: Receive, sub: Subscriber) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass  # the (empty) request body; the next message is the disconnect
    except Exception:  # a receive that fails: the connection is gone
        pass
    sub.close("client-gone")


def _last_event_id(request: Request) -> str | None:
    return request_header(request.scope, b"last-event-id") or query_value(request.scope, "last_event_id") or None


def _cursors_for(request: Request, topics: list[str]) -> list[str | None]:
    raw = _last_event_id(request)
    if raw is None:
        return [None] * len(topics)
    try:
        if len(topics) == 1:
            parse_cursor(raw)
            return [raw]
        return parse_vector_cursor(raw, len(topics))
    except ProtocolError as exc:
        raise HTTPProblem(400, f"Last-Event-ID: {exc}", kind="bad-cursor") from exc


def _topics(raw: list[str], gateway: Gateway) -> list[str]:
    if not raw:
        raise HTTPProblem(400, "name at least one topic: ?topic=...", kind="bad-topic")
    if len(raw) > gateway.settings.max_topics_per_connection:
        raise HTTPProblem(400, f"at most {gateway.settings.max_topics_per_connection} topics per connection",
                          kind="too-many-topics")
    try:
        topics = [validate_topic(t) for t in raw]
    except ProtocolError as exc:
        raise HTTPProblem(400, str(exc), kind="bad-topic") from exc
    if len(set(topics)) != len(topics):
        raise HTTPProblem(400, "a topic is named twice", kind="bad-topic")
    return topics


async def operation_events(request: Request) -> Response:
    """``GET /operations/{id}/events``: the operation's events from its first, ending after the terminal one."""
    gateway = Gateway.of(request)
    op_id = request.path_params["operation_id"]
    topic = operation_topic(op_id)
    try:
        validate_topic(topic)
    except ProtocolError as exc:
        raise HTTPProblem(404, "no such operation", kind="operation-not-found") from exc
    grant = _authorize(gateway, request, [topic])
    try:
        op = await gateway.broker.get_operation(op_id)
    except BrokerError as exc:
        raise HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                          headers={"Retry-After": "2"}) from exc
    if op is None:
        raise HTTPProblem(404, f"no operation {op_id!r} (unknown or expired)", kind="operation-not-found")
    if not _owner_allows(op, grant, request.scope.get("herald.subject")):
        raise HTTPProblem(403, "this operation belongs to someone else", kind="forbidden-topic")
    cursors = _cursors_for(request, [topic])
    if op.status.terminal and cursors[0] is not None:
        try:
            rest = await gateway.broker.read(topic, cursors[0], limit=1)
        except BrokerError as exc:
            raise HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                              headers={"Retry-After": "2"}) from exc
        if not rest.events:
            # Resumed after the terminal event: nothing more will ever come. 204 is what tells an
            # EventSource to stop reconnecting; a 200 would hold it open, idle, forever.
            return Response(status_code=204)
    return EventStream(gateway, [topic], cursors, end_on_terminal=True, expires_at=grant.expires_at,
                       seat=admit(gateway, request, _token(request)))


async def topic_events(request: Request) -> Response:
    """``GET /topics/{topic}/events`` or ``GET /topics/events?topic=a&topic=b``."""
    gateway = Gateway.of(request)
    one = request.path_params.get("topic")
    topics = _topics([unquote(one)] if one else list(query_values(request.scope).get("topic", ())), gateway)
    grant = _authorize(gateway, request, topics)
    await _check_owners(gateway, request, topics, grant)
    single_operation = len(topics) == 1 and topics[0].startswith("operations/")
    cursors = _cursors_for(request, topics)
    # admitted last, once nothing can refuse the stream: the stream gives the seat back when it ends
    return EventStream(gateway, topics, cursors, end_on_terminal=single_operation, expires_at=grant.expires_at,
                       seat=admit(gateway, request, _token(request)))


# WebSocket -----------------------------------------------------------------------------

class SocketSession:
    """One WebSocket: a reader (this task's child) and a writer (the endpoint's own coroutine)."""

    def __init__(self, gateway: Gateway, websocket: WebSocket, *, url_token: str | None, topics: list[str]) -> None:
        self.gateway = gateway
        self.ws = websocket
        self.sub = Subscriber(gateway.settings.queue_size, "ws")
        self.url_token = url_token
        self.url_topics: list[str] | None = topics
        """The topics named in the URL, subscribed once the socket is accepted (then let go)."""
        self.close_code = 1000
        self.close_reason = ""
        self._commands: set[asyncio.Task[None]] | None = None  # made on the first command: most sockets send none
        self._handling: asyncio.Task[None] | None = None  # a message being awaited (SocketWatch)
        self.writer: FrameWriter | None = None
        # HERALD_WS_RATE as a token bucket: a burst of twice the rate, then the rate
        self._allowance = max(1.0, 2 * gateway.settings.ws_rate)
        self._last = 0.0

    async def run(self) -> None:
        """Serve the socket until either side ends it."""
        await self.ws.accept()
        # The handshake's headers were read (origin, token, bearer subject); for its life the socket needs only
        # Host (the URLs a command's answer carries), so the rest (0.7 KiB) is let go.
        scope = self.ws.scope
        scope["headers"] = [(name, value) for name, value in scope["headers"] if name == b"host"]
        del scope
        self.gateway.hub.join(self.sub)  # counted from its accept, whether it follows topics or not
        self.sub.task = asyncio.current_task()
        # Herald's uvicorn protocol, reached through no middleware that stands in for the socket: its messages
        # are taken by hand (SocketWatch); anything else is read by a task of its own
        self.writer = take_frame_writer(self.ws.scope)
        receive = getattr(self.ws, "_receive", None)
        if self.writer is not None and not self.writer.serves(getattr(self.ws, "_send", None), receive):
            self.writer = None
        reader: SocketWatch | asyncio.Future[None] = (
            SocketWatch(receive, self) if self.writer is not None and receive is not None
            else asyncio.ensure_future(self._read()))
        try:
            topics, self.url_topics = self.url_topics or [], None
            for topic in topics:
                await self._subscribe(topic, None, None, None)
            del topics
            await self._write()
        except asyncio.CancelledError:
            if self.sub.reason != "slow-consumer":
                raise
        finally:
            reader.cancel()
            if self._handling is not None:
                self._handling.cancel()
            for task in self._commands or ():
                task.cancel()
            await self.gateway.hub.leave(self.sub)
        if self.sub.reason == "slow-consumer":
            self._limited("ws-queue-overflow")
        if self.sub.reason in _RECONNECT_CODES:
            self.close_code = _RECONNECT_CODES[self.sub.reason]
            self.close_reason = RECONNECT_REASONS[self.sub.reason]
        if self.sub.reason != "client-gone":
            try:
                await self.ws.close(self.close_code, self.close_reason[:120])
            except (RuntimeError, OSError):
                pass

    async def _write(self) -> None:
        send = self.ws.send_text
        # under Herald's uvicorn protocol (see run): an event frame is written whole, framed once for every
        # socket, and an idle socket's frames are written by the hub without waking this coroutine
        write = self.writer
        if write is not None:
            self.sub.direct = _DirectFrame(write)
        try:
            while True:
                batch = await self.sub.next_batch()
                if not batch:
                    return
                for item in batch:
                    if item is HEARTBEAT:
                        continue  # the WebSocket layer's own pings keep the connection alive
                    if isinstance(item, Gap):
                        await send(ws_message("gap", **_gap_fields(item)))
                    elif not isinstance(item, Frame):
                        await send(item)  # type: ignore[arg-type]
                    elif write is None or not write(item.ws_frame):
                        await send(item.ws)
        finally:
            self.sub.direct = None

    def _fail(self, code: int, reason: str) -> None:
        self.close_code = code
        self.close_reason = reason
        self.sub.close("protocol")

    def _limited(self, reason: str) -> None:
        if self.gateway.metrics is not None:
            self.gateway.metrics.limited(reason)

    async def _read(self) -> None:
        """The reading loop, for a ``receive`` that Herald's uvicorn protocol does not vouch for."""
        try:
            while not self.sub.closed:
                text = self._take(await self.ws.receive())
                if text is not None:
                    await self._handle(text)
        except WebSocketDisconnect:
            pass
        self.sub.close("client-gone")

    def got(self, message: Message, watch: SocketWatch) -> bool:
        """A message taken by ``watch``; whether it may ask for the next one now (else it is resumed later)."""
        text = self._take(message)
        if text is None:
            return not self.sub.closed
        self._handling = asyncio.ensure_future(self._handle_then(text, watch))
        return False

    async def _handle_then(self, text: str, watch: SocketWatch) -> None:
        try:
            await self._handle(text)
        finally:
            self._handling = None
        watch.resume()

    def _take(self, message: Message) -> str | None:
        """The text of a message to handle, or ``None`` (the client left, or the socket is failed for it)."""
        if message["type"] == "websocket.disconnect":
            self.sub.close("client-gone")
            return None
        rate = self.gateway.settings.ws_rate
        if rate:
            now = time.monotonic()
            self._allowance = min(max(1.0, 2 * rate), self._allowance + (now - (self._last or now)) * rate)
            self._last = now
            if self._allowance < 1:
                self._limited("ws-message-rate")
                self._fail(WS_CLOSE_POLICY, f"more than {rate:g} messages per second; slow down")
                return None
            self._allowance -= 1
        text: str | None = message.get("text")
        if text is None:
            self._fail(WS_CLOSE_UNSUPPORTED, "binary messages are not supported; send JSON text")
            return None
        limit = self.gateway.settings.max_ws_message
        # a character is up to 4 bytes: encode only when the length alone cannot decide
        if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
            self._fail(WS_CLOSE_TOO_BIG, f"messages are limited to {limit} bytes")
            return None
        return text

    async def _handle(self, text: str) -> None:
        try:
            frame = parse_client_frame(text)
        except ProtocolError as exc:
            self.sub.control(ws_message("error", code="bad-message", detail=str(exc)))
            return
        if frame.type == "ping":
            self.sub.control(ws_message("pong", id=frame.id))
        elif frame.type == "subscribe":
            assert frame.topic is not None
            await self._subscribe(frame.topic, frame.cursor, frame.token, frame.id)
        elif frame.type == "unsubscribe":
            assert frame.topic is not None
            await self.gateway.hub.detach(self.sub, frame.topic)
            self.sub.control(ws_message("unsubscribed", topic=frame.topic, id=frame.id))
        else:
            commands = self._commands
            if commands is None:
                commands = self._commands = set()
            limit = self.gateway.settings.ws_max_inflight
            if len(commands) >= limit:
                # refused before any task exists: a flood of commands costs one small reply each, and
                # the replies count against the queue bound
                self._limited("ws-commands-inflight")
                problem = HTTPProblem(429, f"at most {limit} commands per socket wait for their answer; wait for one",
                                      kind="too-many-commands")
                self.sub.control(ws_message("error", id=frame.id, code="too-many-commands", status=429,
                                            problem=problem.document()))
                return
            task = asyncio.ensure_future(self._command(frame.id, frame.command or {}))
            commands.add(task)
            task.add_done_callback(commands.discard)

    async def _subscribe(self, topic: str, cursor: str | None, token: str | None, ref: Any) -> None:
        gateway = self.gateway
        try:
            validate_topic(topic)
            if cursor is not None:
                parse_cursor(cursor)
        except ProtocolError as exc:
            self.sub.control(ws_message("error", code="bad-topic", topic=topic, id=ref, detail=str(exc)))
            return
        if topic in self.sub.positions:
            self.sub.control(ws_message("error", code="already-subscribed", topic=topic, id=ref,
                                        detail="already subscribed; unsubscribe first to move the cursor"))
            return
        if len(self.sub.positions) >= gateway.settings.max_topics_per_connection:
            self._fail(WS_CLOSE_POLICY, f"at most {gateway.settings.max_topics_per_connection} topics per socket")
            return
        try:
            grant = _grant(gateway, token or self.url_token, [topic], self.ws.scope.get("herald.subject"))
            await _check_owners(gateway, self.ws, [topic], grant)
        except HTTPProblem as exc:
            self.sub.control(ws_message("error", code="forbidden" if exc.status == 403 else "broker-unavailable",
                                        status=exc.status, topic=topic, id=ref, detail=exc.detail))
            return
        except TokenError as exc:
            if ref is None and token is None:  # a topic named in the URL: the whole socket is unauthorized
                self._fail(WS_CLOSE_UNAUTHORIZED, exc.detail)
                return
            self.sub.control(ws_message("error", code="forbidden" if exc.status == 403 else "unauthorized",
                                        status=exc.status, topic=topic, id=ref, detail=exc.detail))
            return

        def announce(start: str | None, page: HistoryPage | None) -> None:
            # after a lost history (page.reset) the subscription starts before the first event kept
            begins = "0-0" if page is not None and page.reset else start or "0-0"
            self.sub.control(ws_message("subscribed", topic=topic, cursor=begins, id=ref))
            if page is not None and page.truncated:
                self.sub.control(ws_message("gap", topic=topic, cursor=cursor, oldest=page.oldest, detail=GAP_DETAIL))

        try:
            await gateway.hub.follow(self.sub, topic, cursor, from_start=topic.startswith("operations/"),
                                     announce=announce)
        except BrokerError:
            self.sub.control(ws_message("error", code="broker-unavailable", topic=topic, id=ref,
                                        detail="the broker is unreachable; subscribe again shortly"))
        else:
            # the socket holds one slot, its earliest token's: when that expires, the whole socket closes 4003
            gateway.hub.expire_at(self.sub, grant.expires_at)

    async def _command(self, ref: Any, command: dict[str, Any]) -> None:
        gateway = self.gateway
        router = gateway.commands
        assert router is not None
        method = str(command.get("method", "")).upper()
        path = str(command.get("path", ""))
        headers = {k.lower(): v for k, v in command.get("headers", {}).items()}
        matched = router.match(method, path)
        try:
            if matched is None:
                raise HTTPProblem(404, f"no command at {method} {path[:100]}", kind="no-such-command")
            spec, params = matched
            result = await submit(
                self.ws, spec, params, command.get("body"),
                path=path,
                idempotency_key=headers.get("idempotency-key"),
                prefer=parse_prefer([headers["prefer"]] if "prefer" in headers else [],
                                    max_wait=gateway.settings.max_wait),
                traceparent=headers.get("traceparent"),
                owner=self.ws.scope.get("herald.subject"),
            )
        except HTTPProblem as exc:
            self.sub.control(ws_message("error", id=ref, status=exc.status, problem=exc.document()))
            return
        self.sub.control(ws_message("operation", id=ref, status=result.status, operation=result.body))


async def websocket_endpoint(websocket: WebSocket) -> None:
    """``/ws``: subscribe, unsubscribe, ping and commands as JSON text messages."""
    gateway = Gateway.of(websocket)
    # the handshake is read through a connection object of its own: what it parses and caches (headers, query,
    # cookies, URL) goes with it, instead of living on the WebSocket as long as the socket (1 KiB each)
    handshake = HTTPConnection(websocket.scope)
    token = _token(handshake)
    try:
        if not _origin_allowed(handshake, gateway.settings):
            raise HTTPProblem(403, "this page's origin may not open Herald's WebSocket (see HERALD_CORS_ORIGINS)",
                              kind="forbidden-origin")
        seat = admit(gateway, handshake, token)
    except HTTPProblem as exc:
        # Refuse the handshake with the problem an HTTP client gets; a close before accept is a bare 403.
        await websocket.send_denial_response(problem_response(exc))
        return
    topics = handshake.query_params.getlist("topic")
    del handshake
    try:
        await SocketSession(gateway, websocket, url_token=token, topics=topics).run()
    finally:  # after the close too: a socket that has not taken its close frame yet still holds its seat
        gateway.admission.release(seat)


routes = [
    Route("/operations/{operation_id}/events", operation_events, methods=["GET"]),
    Route("/topics/events", topic_events, methods=["GET"]),
    Route("/topics/{topic:path}/events", topic_events, methods=["GET"]),
    WebSocketRoute("/ws", websocket_endpoint),
]


class PushMiddleware:
    """Serves the push routes above (SSE streams and ``/ws``) before Starlette's router does.

    A stream or socket lives as long as its client, and so does every frame on its stack: the
    router, the route, the exception-handling wrappers and, for SSE, the request with its parsed
    headers and query. Installed innermost (inside CORS and bearer authentication), this answers
    the push routes itself and drops an SSE request once the handshake is done: 4.5 KiB less per
    idle SSE connection (bench scenario A). Problems are answered as the app's exception handler
    would; anything else propagates to Starlette's ServerErrorMiddleware. The routes stay in
    :data:`routes`, so an app without this middleware serves the same endpoints.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes = [r for r in routes if isinstance(r, Route)]
        self.sockets = [r for r in routes if isinstance(r, WebSocketRoute)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a stream route, or hand the request on."""
        if scope["type"] == "http" and scope["method"] == "GET":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    # the path parameters go to the handshake's own scope, not the one the stream keeps
                    request = Request({**scope, **child_scope}, receive)
                    try:
                        response: Response = await route.endpoint(request)
                    except HTTPProblem as exc:
                        response = problem_response(exc)
                    del request, child_scope  # the handshake is over; the stream needs none of it
                    await response(scope, receive, send)
                    return
        elif scope["type"] == "websocket":
            for socket_route in self.sockets:
                match, child_scope = socket_route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    await socket_route.endpoint(WebSocket(scope, receive, send))
                    return
        await self.app(scope, receive, send)
