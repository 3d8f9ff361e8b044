"""Herald's uvicorn adapter: the one module that knows uvicorn's internals.

``herald serve`` runs uvicorn with :class:`HttpToolsProtocol` (by hand: ``uvicorn ... --http
herald.http.fastwrite:HttpToolsProtocol``, as the benchmark does). Without it, under uvicorn's own
protocols or another ASGI server, Herald works the same through plain ASGI, only slower to fan out.

Why: handing a frame to an idle SSE stream otherwise wakes the stream's coroutine, which sends
the frame down the ASGI ``send`` chain (Starlette's wrapper, then uvicorn's ``send``), which frames
it as an HTTP chunk and writes it. In a fan-out that round costs about as much CPU as the socket
write itself: bench scenario B (1,000 streams on one topic) took 17-18 µs of gateway CPU per
delivery through it and 10-12 µs with this write, of which the kernel's write is most.

The contract, as the push endpoints (:mod:`herald.http.push`) rely on it:

* This protocol is uvicorn's httptools protocol. Each GET request's scope gets a
  :class:`ChunkWriter` in ``scope["extensions"][CHUNK_WRITE]``; the stream takes it out with
  :func:`take_chunk_writer` (no writer: plain ASGI).
* ``write(body) -> bool`` writes ``body`` as one chunk of the response, at once, *only if* the
  response is a started, unfinished, chunked one, the client is still connected, uvicorn has not
  paused writing, and the transport holds nothing unsent (so the write can neither overtake bytes
  still queued nor bypass flow control). Otherwise it writes nothing and returns ``False``, and the
  caller takes the normal path through ``send``. A slow client therefore still fills the stream's
  bounded queue and is cut off as a slow consumer, as without this protocol.
* ``write`` never raises. Should uvicorn's state fail it anyway, the writer logs it (once per
  process), answers ``False`` from then on, and the frame goes through ``send``.
* ``serves(receive)`` says whether ``receive`` is uvicorn's own for this request, i.e. nothing
  between the server and the app stands in for the connection. Only then may the app write
  directly (a ``BaseHTTPMiddleware`` runs the app in a task of its own and relays its messages
  through a stream: a direct write could overtake them) and step ``receive()`` by hand without a
  task (uvicorn's is a plain coroutine that awaits an ``asyncio.Event``; a wrapped one may need a
  task of its own, as anyio's cancel scopes do). A middleware that rewrites the body (compression)
  must leave ``text/event-stream`` alone, as Starlette's ``GZipMiddleware`` does.

The same protocol sends the status line and headers of a response to anything but a GET or HEAD
in one write with its first body bytes (:class:`_Cork`): uvicorn writes them apart, two system calls
and two wake-ups of the client for every 202.

Each connection's two ``asyncio.Event`` (the flow control's and the request cycle's) and its
pipeline ``deque`` are swapped for :class:`_Gate` and :class:`_Pipeline`, which do what uvicorn
asks of them without a ``collections.deque`` each: a deque is 760 bytes, and these three were
2.2 KiB of the 14 KiB an idle SSE stream held (tracemalloc of 2,000 streams).

The writer reads uvicorn's private ``RequestResponseCycle`` state (``response_started``,
``response_complete``, ``chunked_encoding``, ``disconnected``, ``flow.write_paused``, ``transport``,
``receive``) and the protocol's ``cycle`` and ``scope``. Those live on instances, so they are
checked once per process, against the first request's live cycle, before any writer is handed
out (:func:`check_cycle`). If anything is missing or of another kind (a uvicorn release renamed
it), the protocol logs one warning and from then on behaves exactly as uvicorn's own: no writer,
plain ASGI. tests/herald/http/test_fastwrite.py runs all of this in a real uvicorn of the
installed version.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from typing import Any, ClassVar

import uvicorn
from starlette.types import Receive
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.websockets import websockets_sansio_impl
from websockets.protocol import State
from websockets.server import ServerProtocol

log = logging.getLogger("herald.fastwrite")

CHUNK_WRITE = "herald.chunk_write"
"""The scope extension holding the request's :class:`ChunkWriter`, see the module docstring."""

_LATE_HEADERS = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                 b"content-length: 40\r\nconnection: close\r\n\r\nthe request's headers took too long.\r\n\r\n")
_MISSING = object()
_FLAGS = ("disconnected", "response_started", "response_complete")
_TRANSPORT_CALLS = ("is_closing", "get_write_buffer_size", "write")


def check_cycle(cycle: Any) -> str | None:
    """What of uvicorn's response-cycle state the writer reads is missing from ``cycle``, or ``None``."""
    if not isinstance(getattr(cycle, "scope", None), dict):
        return "RequestResponseCycle.scope (a dict)"
    for name in _FLAGS:
        if not isinstance(getattr(cycle, name, None), bool):
            return f"RequestResponseCycle.{name} (a bool)"
    # `in` compares with ==: the default must not look like a bool, as 0 would
    if getattr(cycle, "chunked_encoding", _MISSING) not in (None, True, False):
        return "RequestResponseCycle.chunked_encoding (None or a bool)"
    if not isinstance(getattr(getattr(cycle, "flow", None), "write_paused", None), bool):
        return "RequestResponseCycle.flow.write_paused (a bool)"
    transport = getattr(cycle, "transport", None)
    for name in _TRANSPORT_CALLS:
        if not callable(getattr(transport, name, None)):
            return f"the transport's {name}()"
    if not inspect.iscoroutinefunction(getattr(type(cycle), "receive", None)):
        return "RequestResponseCycle.receive (a coroutine function)"
    return None


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """uvicorn's httptools protocol; GET requests get a :class:`ChunkWriter` in their scope."""

    fast_path: ClassVar[bool | None] = None
    """Whether this process's uvicorn passed :func:`check_cycle`; ``None`` until its first request."""
    header_timeout: ClassVar[float] = 10.0
    """Seconds a request's headers may take to arrive (``HERALD_HEADER_TIMEOUT``; ``herald serve`` sets it)."""
    header_timeouts: ClassVar[int] = 0
    """Requests this process cut off because their headers were late (read by the metrics)."""
    _header_timer: asyncio.TimerHandle | None = None
    _cork: _Cork | None = None

    # Slowloris: uvicorn waits for a request's headers as long as the client keeps the connection
    # open, so a client trickling a byte at a time holds a connection (and a slot) forever. From
    # the connection's first byte (or a kept-alive connection's next request) the headers get
    # ``header_timeout`` seconds; then the connection is answered 408 and closed.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers; lighter flow-control event and pipeline."""
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
        flow: Any = getattr(self, "flow", None)
        if isinstance(getattr(flow, "_is_writable_event", None), asyncio.Event) and isinstance(
                getattr(self, "pipeline", None), collections.deque):
            flow._is_writable_event = _Gate(flow._is_writable_event.is_set())
            self.pipeline = _Pipeline()  # type: ignore[assignment]  # does what uvicorn asks of its deque

    def on_message_begin(self) -> None:
        """A request begins: its headers get the timeout (a kept-alive connection's next one too)."""
        super().on_message_begin()
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock with the connection."""
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None:
            timer.cancel()

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport.is_closing():
            return
        HttpToolsProtocol.header_timeouts += 1
        transport.write(_LATE_HEADERS)
        transport.close()

    def on_headers_complete(self) -> None:
        """Let uvicorn set up the request, then add the writer bound to its response cycle."""
        self._cancel_header_timer()
        super().on_headers_complete()
        fast = HttpToolsProtocol.fast_path
        if fast is None:
            fast = _settle(self)
        if not fast:
            return
        cycle = self.cycle
        # an upgrade (WebSocket) or a refused request makes no new cycle for this scope
        if cycle is None or cycle.scope is not self.scope:
            return
        if type(cycle.message_event) is asyncio.Event and not cycle.message_event.is_set():
            # made just now by uvicorn, not awaited yet: the task has not run
            cycle.message_event = _Gate(False)  # type: ignore[assignment]
        method = self.scope["method"]
        if method == "GET":
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[CHUNK_WRITE] = ChunkWriter(cycle)
        elif method != "HEAD":  # a HEAD's headers have no body to wait for; a GET may be a stream (see _Cork)
            self._cork = cycle.transport = _Cork(cycle, self.transport, self.loop)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """A response's held headers go out before anything this data makes uvicorn write (a 400, say)."""
        cork = self._cork
        if cork is not None and cork.holding:
            cork.flush()
        super().data_received(data)

    def on_response_complete(self) -> None:
        """Drop an unused writer with its response (it refers to the cycle, which refers to the scope)."""
        if HttpToolsProtocol.fast_path:
            cycle = self.cycle
            if cycle is not None and cycle.response_complete:  # not a pipelined request's cycle, not started yet
                take_chunk_writer(cycle.scope)
        super().on_response_complete()


class _Pipeline(list[Any]):
    """The protocol's queue of pipelined requests, as uvicorn uses it (``appendleft``, ``pop``, truth), in a list."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        """Queue a request behind the others (``pop`` takes the oldest)."""
        self.insert(0, item)


class _Cork:
    """A response cycle's transport until its first write has gone out, in one write with the next.

    uvicorn writes a response's status line and headers, then its body, as two writes: two system
    calls, and two wake-ups of the client. The cork holds the first write (the status line and
    headers, or an ``100 Continue``) until the next one, which takes it along, or until the end of
    the loop turn (a body that waits), whichever comes first; then it gives the cycle back its
    transport. Only requests other than GET and HEAD get one: commands, whose 202 is the hot path.
    Corked SSE streams measured 1.4 KiB more per idle connection (5,000 streams, two runs each way;
    the cause was not found), and a stream's connect saves only one of its system calls by it.
    Nothing can overtake what it holds: the cycle writes only through it, ``close`` sends it first,
    and the protocol sends it before it reads more of the connection (where uvicorn could answer a
    bad request itself).
    """

    __slots__ = ("_cycle", "_held", "_loop", "_transport")

    def __init__(self, cycle: httptools_impl.RequestResponseCycle, transport: asyncio.Transport,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._cycle: Any = cycle
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    @property
    def holding(self) -> bool:
        """Whether a write waits in the cork."""
        return self._held is not None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None and self._cycle.transport is self:  # the first write: hold it until the next, or the turn's end
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._release()
        self._transport.write(held + data if held else data)

    def flush(self) -> None:
        """Write what is held, and give the cycle its transport back (the end of the loop turn calls this)."""
        held = self._held
        self._release()
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def _release(self) -> None:
        self._held = None
        if self._cycle.transport is self:
            self._cycle.transport = self._transport

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()  # what is held goes first in the next write: no overtaking

    def __getattr__(self, name: str) -> Any:  # anything else a cycle may ask of its transport
        return getattr(self._transport, name)


def _settle(protocol: HttpToolsProtocol) -> bool | None:
    """Decide :attr:`HttpToolsProtocol.fast_path` on this request, once; ``None`` while undecidable."""
    if hasattr(protocol, "cycle") and hasattr(protocol, "scope"):
        cycle = protocol.cycle
        if cycle is None or getattr(cycle, "scope", protocol.scope) is not protocol.scope:
            return None  # a request uvicorn upgraded or refused: it made no cycle, ask the next one
        missing = check_cycle(cycle)
    else:
        missing = "HttpToolsProtocol.cycle and .scope"
    HttpToolsProtocol.fast_path = missing is None
    if missing is not None:
        log.warning("uvicorn %s lacks %s, which Herald's direct SSE write reads: serving plain ASGI instead",
                    uvicorn.__version__, missing, extra={"event": "fastwrite.disabled"})
    return missing is None


def take_chunk_writer(scope: Any) -> ChunkWriter | None:
    """Take the writer out of ``scope`` (``None`` if it has none); the caller keeps it while it needs it.

    Taking it leaves no dict behind, and no reference cycle scope → writer → cycle → scope.
    """
    extensions = scope.get("extensions")
    if not extensions:
        return None
    write: ChunkWriter | None = extensions.pop(CHUNK_WRITE, None)
    if not extensions:
        del scope["extensions"]
    return write


class _Retired:
    """Stands in for the cycle of a writer that failed once: it reads as disconnected, so writes stop."""

    disconnected = True


_RETIRED = _Retired()


class ChunkWriter:
    """``write(body) -> bool`` for one response cycle (a slotted object: one per open stream)."""

    __slots__ = ("_cycle",)

    failure_logged: ClassVar[bool] = False
    """Whether a writer of this process failed already (logged once, with its traceback)."""

    def __init__(self, cycle: httptools_impl.RequestResponseCycle) -> None:
        # Any: after a failure this holds _RETIRED, which has only the one attribute read first
        self._cycle: Any = cycle

    def __call__(self, body: bytes) -> bool:
        """Write ``body`` as one chunk now if nothing can be overtaken or held back; else ``False``."""
        cycle = self._cycle
        try:  # free while nothing raises; anything that does is uvicorn's state not being what we read
            if (cycle.disconnected or not cycle.response_started or cycle.response_complete
                    or cycle.chunked_encoding is not True or cycle.flow.write_paused):
                return False
            transport = cycle.transport
            if transport.is_closing() or transport.get_write_buffer_size():
                return False
            transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        except Exception:
            self._retire()
            return False
        return True

    def serves(self, receive: Receive) -> bool:
        """Whether ``receive`` is uvicorn's own for this request (see the module docstring)."""
        own = getattr(self._cycle, "receive", None)  # a bound method: a new object each time, equal to its twins
        return own is not None and bool(receive == own)

    def _retire(self) -> None:
        self._cycle = _RETIRED
        if not ChunkWriter.failure_logged:
            ChunkWriter.failure_logged = True
            log.warning("Herald's direct SSE write failed on uvicorn %s; that stream's frames go through ASGI",
                        uvicorn.__version__, exc_info=True, extra={"event": "fastwrite.failed"})


# WebSocket -----------------------------------------------------------------------------------

FRAME_WRITE = "herald.frame_write"
"""The scope extension holding a socket's :class:`FrameWriter` (under :class:`WebSocketProtocol`)."""
_WS_STATE = {"queue": asyncio.Queue, "writable": asyncio.Event, "conn": ServerProtocol, "handshake_complete": bool,
             "close_sent": bool, "disconnected": bool}


class _Inbox:
    """What uvicorn's socket protocol uses of its ``asyncio.Queue`` (``put_nowait``, ``get``, ``empty``).

    An ``asyncio.Queue`` makes three deques and an ``Event`` (a fourth) up front: 3 KiB per idle
    socket, for a queue that holds at most a message or two.
    """

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    def put_nowait(self, item: Any) -> None:
        """Add ``item``; wake one waiting ``get``."""
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self) -> Any:
        """The oldest item, once there is one."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
                if not self._waiters:
                    self._waiters = None
        item = self._items.popleft()
        if not self._items:
            self._items = None  # a deque keeps its 0.5 KiB block while empty: an idle socket has none
        return item

    def empty(self) -> bool:
        """Whether nothing is waiting to be got."""
        return not self._items


class _Gate:
    """What uvicorn uses of an ``asyncio.Event`` (``set``, ``clear``, ``is_set``, ``wait``), without a deque up front.

    The socket protocol's ``writable``, and the HTTP protocol's flow control and each request's
    ``message_event``: most never have a waiter, none has more than one at a time.
    """

    __slots__ = ("_open", "_waiters")

    def __init__(self, open: bool = True) -> None:
        self._open = open
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        """Whether it is open (set)."""
        return self._open

    def set(self) -> None:
        """Open; wake every ``wait``."""
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Close (unset)."""
        self._open = False

    async def wait(self) -> None:
        """Return once open: at once if it is, else at the next ``set`` (as ``asyncio.Event.wait``)."""
        if self._open:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters = self._waiters  # ``set`` let go of the list; a cancelled wait takes itself out
            if waiters and waiter in waiters:
                waiters.remove(waiter)


class WebSocketProtocol(websockets_sansio_impl.WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, lighter per idle socket, with a direct frame write.

    ``herald serve`` runs it (by hand: ``uvicorn ... --ws herald.http.fastwrite:WebSocketProtocol``).
    Its receive queue and ``writable`` event are :class:`_Inbox` and :class:`_Gate`, made lazily; the
    handshake's request and response are dropped once the socket is accepted (uvicorn keeps both for
    the socket's life); and the scope gets a :class:`FrameWriter` in ``extensions[FRAME_WRITE]``, the
    WebSocket twin of :class:`ChunkWriter`. The state it reads (:data:`_WS_STATE`, and the
    websockets ``ServerProtocol``'s ``state`` and ``extensions``) is checked on the first socket; if
    any is missing or of another kind it logs one warning and behaves exactly as uvicorn's own.
    """

    light: ClassVar[bool | None] = None
    """Whether this process's uvicorn has the state this protocol reads; ``None`` until the first socket."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        light = WebSocketProtocol.light
        if light is None:
            light = _settle_ws(self)
        if light:
            self.queue = _Inbox()  # type: ignore[assignment]
            self.writable = _Gate()  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        """Let uvicorn answer the handshake and make the scope, then add the writer to the scope."""
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if WebSocketProtocol.light and scope is not None and not self.handshake_complete:
            scope.setdefault("extensions", {})[FRAME_WRITE] = FrameWriter(self)

    async def send(self, message: Any) -> None:
        """uvicorn's send; after the accept, the handshake's request and response are let go."""
        await super().send(message)
        if self.handshake_complete and WebSocketProtocol.light and getattr(self, "response", None) is not None:
            # the request also stays in the handshake parser's frame for the socket's life: its headers go
            self.request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]  # read before the accept only


def _settle_ws(protocol: WebSocketProtocol) -> bool:
    """Decide :attr:`WebSocketProtocol.light` on the first socket, once."""
    missing = next((f"{name} ({kind.__name__})" for name, kind in _WS_STATE.items()
                    if not isinstance(getattr(protocol, name, None), kind)), None)
    if missing is None and not inspect.iscoroutinefunction(getattr(type(protocol), "receive", None)):
        missing = "receive (a coroutine function)"
    WebSocketProtocol.light = missing is None
    if missing is not None:
        log.warning("uvicorn %s's websockets-sansio protocol lacks %s, which Herald's lighter sockets read: "
                    "serving it as uvicorn's own", uvicorn.__version__, missing, extra={"event": "fastwrite.ws"})
    return missing is None


def take_frame_writer(scope: Any) -> FrameWriter | None:
    """Take the socket's writer out of ``scope`` (``None`` if it has none), as :func:`take_chunk_writer` does."""
    extensions = scope.get("extensions")
    return extensions.pop(FRAME_WRITE, None) if extensions else None


class FrameWriter:
    """``write(frame) -> bool`` for one socket: a whole server frame (``Frame.ws_frame``) written now, or not at all.

    Written only while the socket is open and accepted, not closing, not compressed (a negotiated
    extension frames each message itself), uvicorn's writing not paused, and the transport holding
    nothing unsent; otherwise ``False``, and the message goes through ``send``. Never raises: a
    failure retires the writer (logged once), as :class:`ChunkWriter` does.
    """

    __slots__ = ("_protocol",)

    failure_logged: ClassVar[bool] = False

    def __init__(self, protocol: WebSocketProtocol) -> None:
        self._protocol: Any = protocol

    def __call__(self, frame: bytes) -> bool:
        """Write ``frame`` now if nothing can be overtaken or held back; else ``False``."""
        protocol = self._protocol
        try:
            if (protocol is None or not protocol.handshake_complete or protocol.close_sent or protocol.disconnected
                    or not protocol.writable.is_set()):
                return False
            conn = protocol.conn
            if conn.state is not State.OPEN or conn.extensions:
                return False
            transport = protocol.transport
            if transport.is_closing() or transport.get_write_buffer_size():
                return False
            transport.write(frame)
        except Exception:
            self._protocol = None
            if not FrameWriter.failure_logged:
                FrameWriter.failure_logged = True
                log.warning("Herald's direct WebSocket write failed on uvicorn %s; that socket's messages go "
                            "through ASGI", uvicorn.__version__, exc_info=True, extra={"event": "fastwrite.failed"})
            return False
        return True

    def serves(self, send: Any, receive: Any) -> bool:
        """Whether ``send`` and ``receive`` are uvicorn's own for this socket (no middleware stands in for it)."""
        protocol = self._protocol
        own_send, own_receive = getattr(protocol, "send", None), getattr(protocol, "receive", None)
        return own_send is not None and bool(send == own_send) and bool(receive == own_receive)
