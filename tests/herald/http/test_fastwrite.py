"""Herald's uvicorn protocol (herald/http/fastwrite.py) and the hub's direct write that uses it.

The protocol's writer reads uvicorn's internal response-cycle state, so these tests run it in a
real uvicorn against the installed version: it writes a chunk only into a started, chunked,
unfinished response to a connected client whose transport holds nothing unsent, and the hub
hands it a live frame only when the stream is idle, so nothing is reordered or lost. A uvicorn
whose state is not what the writer reads gets no writer at all (checked once, at its first
request), and a writer that fails anyway answers "not written" instead of raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl

from herald.events import build_event
from herald.http.fastwrite import CHUNK_WRITE, ChunkWriter, HttpToolsProtocol, _Gate, _Pipeline
from herald.hub import Subscriber
from herald.protocol import Frame
from tests.herald.http.harness import LiveHerald, wait_until
from tests.support.sse import sse_connect

# The hub side ----------------------------------------------------------------------------------


def frame(n: int, topic: str = "t") -> Frame:
    return Frame(topic, f"1-{n}", "Tick", b'{"n":%d}' % n)


async def parked(sub: Subscriber) -> asyncio.Task[list[Any]]:
    """A task parked in ``next_batch`` (as a stream's coroutine is between writes)."""
    task = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0)
    assert sub._waiter is not None and not sub._waiter.done()
    return task


async def test_a_live_frame_for_a_parked_stream_is_written_directly_without_waking_it() -> None:
    sub = Subscriber(max_queue=4)
    written: list[Frame] = []
    sub.direct = lambda f: written.append(f) is None
    task = await parked(sub)
    sub.push(frame(1))
    sub.push(frame(2))
    sub.push(frame(2))  # a repeat is still dropped before any write
    await asyncio.sleep(0)
    assert [f.cursor for f in written] == ["1-1", "1-2"]
    assert sub.queue == [] and not task.done()
    assert sub.positions["t"] == (1, 2)
    sub.close("test")
    assert await task == []


async def test_a_frame_the_direct_write_refuses_is_queued_and_wakes_the_stream() -> None:
    sub = Subscriber(max_queue=4)
    sub.direct = lambda f: False
    task = await parked(sub)
    sub.push(frame(1))
    assert [f.cursor for f in await task] == ["1-1"]  # type: ignore[union-attr]


async def test_nothing_overtakes_a_queued_frame_or_a_wake_up_already_under_way() -> None:
    sub = Subscriber(max_queue=8)
    calls: list[str] = []

    def direct(f: Frame) -> bool:
        calls.append(f.cursor)
        return f.cursor != "1-1"  # the first one cannot be written now

    sub.direct = direct
    task = await parked(sub)
    sub.push(frame(1))  # refused: queued, the stream woken
    sub.push(frame(2))  # the queue is not empty: queued behind it, no direct write
    assert calls == ["1-1"]
    assert [f.cursor for f in await task] == ["1-1", "1-2"]  # type: ignore[union-attr]
    task = await parked(sub)
    sub.beat()  # the stream is woken for a heartbeat; a frame now waits its turn
    sub.push(frame(3))
    assert calls == ["1-1"]
    assert [getattr(f, "cursor", "beat") for f in await task] == ["1-3"]


async def test_replayed_history_never_takes_the_direct_write() -> None:
    sub = Subscriber(max_queue=4)
    calls: list[Frame] = []
    sub.direct = lambda f: calls.append(f) is None
    sub.hold("t", None)
    task = await parked(sub)
    sub.push(frame(3))  # live, held while the history is read
    sub.replay("t", [frame(1), frame(2)])
    assert [f.cursor for f in await task] == ["1-1", "1-2", "1-3"]  # type: ignore[union-attr]
    assert calls == []


# The protocol, in a real uvicorn ---------------------------------------------------------------

class Probe:
    """An ASGI app that tries the writer at each stage of a response and records what it said."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}
        self.done = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        write = scope.get("extensions", {}).get(CHUNK_WRITE)
        self.seen["has_writer"] = write is not None
        if write is not None:
            self.seen["serves"] = write.serves(receive)
        try:
            if write is None:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"no writer"})
                return
            self.seen["before_start"] = write(b"x")
            if scope["path"] == "/sized":
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
                self.seen["sized"] = write(b"x")
                await send({"type": "http.response.body", "body": b"hello"})
                return
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            self.seen["chunked"] = write(b"direct")
            if scope["path"] == "/fill":
                writes = 0
                while writes < 2000 and write(b"f" * 65536):
                    writes += 1
                self.seen["fill_writes"] = writes
                await self.release.wait()
                self.seen["after_gone"] = write(b"x")
                return
            await send({"type": "http.response.body", "body": b"-sent-", "more_body": True})
            self.seen["after_send"] = write(b"again")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.seen["after_end"] = write(b"x")
            self.seen["writer_kept"] = CHUNK_WRITE in scope.get("extensions", {})
        finally:
            self.done.set()


@contextlib.asynccontextmanager
async def serve(app: Probe, http: Any = HttpToolsProtocol) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=http, lifespan="off", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started, timeout=10)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def request(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def test_the_writer_writes_a_chunk_only_into_a_started_unfinished_chunked_response() -> None:
    app = Probe()
    async with serve(app) as port:
        raw = await request(port, get("/stream"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    # the direct chunk, then what went through send, then the direct one after it, then the end
    assert body == b"6\r\ndirect\r\n6\r\n-sent-\r\n5\r\nagain\r\n0\r\n\r\n"
    assert app.seen == {"has_writer": True, "serves": True, "before_start": False, "chunked": True,
                        "after_send": True, "after_end": False, "writer_kept": False}


async def test_the_writer_refuses_a_response_with_a_content_length() -> None:
    app = Probe()
    async with serve(app) as port:
        raw = await request(port, get("/sized"))
    assert raw.endswith(b"\r\n\r\nhello")
    assert app.seen["sized"] is False


async def test_only_get_requests_on_heralds_protocol_get_the_writer() -> None:
    for http, method, expected in ((HttpToolsProtocol, "POST", False), ("httptools", "GET", False),
                                   (HttpToolsProtocol, "GET", True)):
        app = Probe()
        async with serve(app, http) as port:
            await request(port, f"{method} /sized HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                "Connection: close\r\n\r\n".encode())
        assert app.seen["has_writer"] is expected, (http, method)


async def test_the_writer_stops_when_the_client_stops_reading_and_when_it_is_gone() -> None:
    app = Probe()
    async with serve(app) as port:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(get("/fill"))
        await wait_until(lambda: "fill_writes" in app.seen, timeout=10)
        # a client that reads nothing: the socket fills, the transport buffers, the writer says no
        assert 0 < app.seen["fill_writes"] < 2000
        client.close()
        await asyncio.sleep(0.2)
        app.release.set()
        await asyncio.wait_for(app.done.wait(), 5)
    assert app.seen["after_gone"] is False


async def test_a_writer_that_uvicorns_state_fails_answers_no_and_writes_no_more() -> None:
    written: list[bytes] = []
    transport = SimpleNamespace(is_closing=lambda: False, get_write_buffer_size=lambda: 0, write=written.append)
    # a uvicorn that renamed flow control: the writer's read fails
    cycle = SimpleNamespace(disconnected=False, response_started=True, response_complete=False,
                            chunked_encoding=True, transport=transport)
    write = ChunkWriter(cycle)  # type: ignore[arg-type]
    assert write(b"x") is False  # not written, and nothing raised to the hub
    cycle.flow = SimpleNamespace(write_paused=False)
    assert write(b"y") is False  # retired for good: that stream's frames go through send
    assert written == []


def renamed_cycle(old: str, new: str) -> type:
    """uvicorn's RequestResponseCycle as a release that renamed ``old`` to ``new`` would have it (it still works)."""
    source = inspect.getsource(httptools_impl.RequestResponseCycle)
    assert f"self.{old}" in source
    namespace = dict(vars(httptools_impl))
    exec(compile(source.replace(f"self.{old}", f"self.{new}"), httptools_impl.__file__, "exec"), namespace)
    renamed: type = namespace["RequestResponseCycle"]
    return renamed


async def test_a_uvicorn_whose_cycle_lacks_what_the_writer_reads_serves_plain_asgi(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    monkeypatch.setattr(httptools_impl, "RequestResponseCycle", renamed_cycle("chunked_encoding", "chunked"))
    monkeypatch.setattr(HttpToolsProtocol, "fast_path", None)  # as in a fresh process
    app = Probe()
    async with serve(app) as port:
        first = await request(port, get("/sized"))
        second = await request(port, get("/stream"))
    assert first.startswith(b"HTTP/1.1 200") and b"no writer" in first and b"no writer" in second
    assert app.seen == {"has_writer": False}
    assert HttpToolsProtocol.fast_path is False
    warnings = [r for r in caplog.records if r.name == "herald.fastwrite"]
    assert len(warnings) == 1 and "chunked_encoding" in warnings[0].getMessage()

    herald = await make_live()  # the whole app, on Herald's protocol: SSE works, through send
    token = herald.gateway.signer.issue(["news"])
    async with sse_connect(herald.client, f"/topics/news/events?token={token}") as stream:
        await stream.next_block()
        await wait_until(lambda: herald.gateway.hub.connections == 1)
        [sub] = herald.gateway.hub._subscribers
        assert sub.direct is None
        await herald.broker.publish("news", build_event("bench.tick", {"n": 1}, source="test"))
        assert (await stream.next_message()).json()["data"] == {"n": 1}
    await wait_until(lambda: herald.gateway.hub.connections == 0)


async def test_streams_of_the_app_take_the_direct_write_through_its_own_middleware(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    herald = await make_live(cors_origins=("https://chat.example",))  # CORS, PushMiddleware, error handling
    token = herald.gateway.signer.issue(["news"])
    async with sse_connect(herald.client, f"/topics/news/events?token={token}",
                           headers={"Origin": "https://chat.example"}) as stream:
        await stream.next_block()
        await wait_until(lambda: herald.gateway.hub.connections == 1)
        [sub] = herald.gateway.hub._subscribers
        assert sub.direct is not None
        assert HttpToolsProtocol.fast_path is True
        await herald.broker.publish("news", build_event("bench.tick", {"n": 2}, source="test"))
        assert (await stream.next_message()).json()["data"] == {"n": 2}
    await wait_until(lambda: herald.gateway.hub.connections == 0)


# The cork: a response's status line and headers go out with its first body bytes ---------------


class Wire:
    """A transport that records each write (one write, one system call)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def corked() -> tuple[Any, Wire, SimpleNamespace]:
    from herald.http.fastwrite import _Cork

    wire = Wire()
    cycle = SimpleNamespace()
    cycle.transport = _Cork(cycle, wire, asyncio.get_running_loop())  # type: ignore[arg-type]
    return cycle.transport, wire, cycle


async def test_the_headers_wait_for_the_body_and_go_in_one_write() -> None:
    cork, wire, cycle = corked()
    cycle.transport.write(b"HTTP/1.1 202 Accepted\r\n\r\n")
    assert wire.writes == [] and cork.holding
    cycle.transport.write(b"{}")
    assert wire.writes == [b"HTTP/1.1 202 Accepted\r\n\r\n{}"]
    assert cycle.transport is wire  # the cycle has its own transport back: later writes cost nothing extra
    await asyncio.sleep(0)  # the end-of-turn flush finds nothing to send
    assert wire.writes == [b"HTTP/1.1 202 Accepted\r\n\r\n{}"]


async def test_headers_whose_body_waits_go_out_at_the_end_of_the_loop_turn() -> None:
    cork, wire, cycle = corked()
    cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert wire.writes == [b"HTTP/1.1 200 OK\r\n\r\n"] and not cork.holding
    cork.write(b"late")  # a writer that kept the cork: straight through, in order
    assert wire.writes == [b"HTTP/1.1 200 OK\r\n\r\n", b"late"]


async def test_closing_sends_what_is_held_first_and_a_closed_transport_gets_nothing() -> None:
    _, wire, cycle = corked()
    cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    cycle.transport.close()
    assert wire.writes == [b"HTTP/1.1 200 OK\r\n\r\n"] and wire.closed
    _, wire2, cycle2 = corked()
    cycle2.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    wire2.closed = True  # the client went away
    await asyncio.sleep(0)
    assert wire2.writes == []


async def test_a_real_uvicorn_answers_in_one_write_and_a_waiting_body_does_not_hold_the_headers() -> None:
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await release.wait()
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": False})
            return
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    writes: list[bytes] = []
    made = HttpToolsProtocol.connection_made

    def spy(self: HttpToolsProtocol, transport: asyncio.Transport) -> None:
        original = transport.write

        class Recorder:  # uvloop's transports cannot take attributes: wrap the one the protocol keeps
            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

            def write(self, data: bytes) -> None:
                writes.append(bytes(data))
                original(data)

        made(self, Recorder())  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HttpToolsProtocol, "connection_made", spy)
        async with serve(app) as port:  # type: ignore[arg-type]
            raw = await request(port, b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 202") and raw.endswith(b"\r\n\r\n{}")
            assert [w for w in writes if w.startswith(b"HTTP/1.1 202")] == [raw]  # status, headers, body: one write
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # before the body exists
            assert head.startswith(b"HTTP/1.1 200")
            release.set()
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
    assert b"data: x" in rest
    assert not next(w for w in writes if w.startswith(b"HTTP/1.1 200")).endswith(b"data: x\n\n")  # headers alone


# The per-connection events and pipeline, lighter than asyncio's --------------------------------------------

async def test_a_gate_waits_as_an_asyncio_event_does() -> None:
    gate = _Gate(False)
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.set()
    gate.clear()  # set, then cleared before the waiter ran: it wakes all the same, as asyncio.Event's does
    await asyncio.wait_for(waiter, 1)
    assert not gate.is_set()
    cancelled = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not gate._waiters  # a cancelled wait leaves nothing behind
    gate.set()
    await asyncio.wait_for(gate.wait(), 1)  # set: at once


async def test_a_connection_gets_the_light_events_and_pipelined_requests_are_answered_in_order() -> None:
    protocols: list[HttpToolsProtocol] = []
    cycles: list[Any] = []
    headers_complete = HttpToolsProtocol.on_headers_complete

    def spy(self: HttpToolsProtocol) -> None:
        headers_complete(self)
        protocols.append(self)
        cycles.append(self.cycle)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:  # the request's body through receive: the cycle's message_event at work
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body) + 1).encode())]})
        await asyncio.sleep(0.01)  # the next request waits in the protocol's pipeline meanwhile
        await send({"type": "http.response.body", "body": body + scope["path"][-1:].encode()})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HttpToolsProtocol, "on_headers_complete", spy)
        async with serve(app) as port:  # type: ignore[arg-type]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            requests = b"".join(f"POST /{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab{i}".encode()
                                for i in range(3))
            writer.write(requests[:-2])
            await asyncio.sleep(0.2)  # the last body comes late: its receive() waits on the cycle's event
            writer.write(requests[-2:])
            answers = [await asyncio.wait_for(reader.readuntil(f"ab{i}{i}".encode()), 10) for i in range(3)]
            writer.close()
    assert [a.startswith(b"HTTP/1.1 200") for a in answers] == [True, True, True]
    assert isinstance(protocols[0].flow._is_writable_event, _Gate)
    assert isinstance(protocols[0].pipeline, _Pipeline) and not protocols[0].pipeline
    assert all(isinstance(c.message_event, _Gate) for c in cycles) and len(cycles) == 3


async def test_a_response_sent_to_a_client_that_reads_late_resumes_through_the_flow_gate() -> None:
    size = 8 * 1024 * 1024  # far past the transport's high-water mark: uvicorn pauses, then drains

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]})
        for _ in range(8):
            await send({"type": "http.response.body", "body": b"z" * (size // 8), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with serve(app) as port:  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
        writer.write(get("/big"))
        await asyncio.sleep(0.3)  # not reading: the server's buffer fills and its send waits on the flow gate
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = await asyncio.wait_for(reader.readexactly(size), 20)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200") and body == b"z" * size
