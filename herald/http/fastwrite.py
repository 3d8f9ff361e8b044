"""uvicorn's httptools protocol with a direct chunk write for SSE frames.

Run the gateway with ``uvicorn ... --http herald.http.fastwrite:HttpToolsProtocol`` (the Procfile,
``make run`` and the benchmark do). Without it Herald works the same, only slower to fan out.

Handing a frame to an idle SSE stream otherwise wakes the stream's coroutine, which sends the
frame down the ASGI ``send`` chain (Starlette's wrapper, then uvicorn's ``send``), which frames it
as an HTTP chunk and writes it. In a fan-out that round costs about as much CPU as the socket
write itself: bench scenario B (1,000 streams on one topic) took 17-18 µs of gateway CPU per
delivery through it and 10-12 µs with this write, of which the kernel's write is most.

This protocol puts a writer in each GET request's scope, ``scope["extensions"][CHUNK_WRITE]``:
``write(body) -> bool`` writes ``body`` as one chunk of the response, at once, *only if* the
response is a started, unfinished, chunked one, the client is still connected, uvicorn has not
paused writing, and the transport holds nothing unsent (so the write can neither overtake bytes
still queued nor bypass flow control). Otherwise it writes nothing and returns ``False``, and
the caller takes the normal path through ``send``. A slow client therefore still fills the
stream's bounded queue and is cut off as a slow consumer, as without this protocol.

The writer reads uvicorn's ``RequestResponseCycle`` state (``response_started``,
``response_complete``, ``chunked_encoding``, ``disconnected``, ``flow.write_paused``): that is
uvicorn's internal interface, checked by tests/herald/http/test_fastwrite.py against the installed
uvicorn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http import httptools_impl

CHUNK_WRITE = "herald.chunk_write"
"""The scope extension: ``write(body: bytes) -> bool``, see the module docstring."""

ChunkWrite = Callable[[bytes], bool]


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """uvicorn's httptools protocol; GET requests get :data:`CHUNK_WRITE` in their scope."""

    def on_headers_complete(self) -> None:
        """Let uvicorn set up the request, then add the writer bound to its response cycle."""
        super().on_headers_complete()
        cycle = self.cycle
        # an upgrade (WebSocket) or a refused request makes no new cycle for this scope
        if cycle is not None and cycle.scope is self.scope and self.scope.get("method") == "GET":
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[CHUNK_WRITE] = ChunkWriter(cycle)

    def on_response_complete(self) -> None:
        """Drop an unused writer with its response (it refers to the cycle, which refers to the scope)."""
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:  # not a pipelined request's cycle, not started yet
            take_chunk_writer(cycle.scope)
        super().on_response_complete()


def take_chunk_writer(scope: Any) -> ChunkWrite | None:
    """Take the writer out of ``scope`` (``None`` if it has none); the caller keeps it while it needs it.

    Taking it leaves no dict behind, and no reference cycle scope → writer → cycle → scope.
    """
    extensions = scope.get("extensions")
    if not extensions:
        return None
    write: ChunkWrite | None = extensions.pop(CHUNK_WRITE, None)
    if not extensions:
        del scope["extensions"]
    return write


class ChunkWriter:
    """``write(body) -> bool`` for one response cycle (a slotted object: one per open stream)."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: httptools_impl.RequestResponseCycle) -> None:
        self._cycle = cycle

    def __call__(self, body: bytes) -> bool:
        """Write ``body`` as one chunk now if nothing can be overtaken or held back; else ``False``."""
        cycle = self._cycle
        transport = cycle.transport
        if (cycle.disconnected or not cycle.response_started or cycle.response_complete
                or cycle.chunked_encoding is not True or cycle.flow.write_paused
                or transport.is_closing() or transport.get_write_buffer_size()):
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True
