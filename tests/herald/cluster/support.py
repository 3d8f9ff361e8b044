"""Processes and clients for the multi-process tests: workers, listeners that reconnect, history.

The gateways are :class:`tests.support.server.HeraldServer` subprocesses and Redis is a
:class:`tests.support.redis_server.RedisServer` of the test's own; this module adds what those
do not cover:

* :class:`WorkerProcess` — ``python -m herald.worker`` as a subprocess (SIGTERM, SIGKILL, restart);
* :class:`SSEListener` and :class:`WSListener` — clients that record every event with its cursor
  and, when their connection ends, reconnect with their cursor (to the same or another gateway);
* :func:`stored` — a topic's history as Redis holds it, to compare with what clients received;
* :func:`a_thousand_operations` — the load test of a deployment (one Redis or a Redis Cluster);
* :func:`rss_bytes`, :func:`eventually` and the raw-socket helpers of the slow-consumer test.

Every wait is bounded in time; every loop in count or time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import orjson
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from herald.auth import TokenSigner
from herald.protocol import join_cursor, parse_cursor
from tests.support.redis_server import RedisServer
from tests.support.server import ROOT, TEST_SECRET, HeraldServer

SIGNER = TokenSigner(TEST_SECRET)
"""Mints subscribe tokens as any gateway of the cluster would (they all share ``HERALD_SECRET``)."""

# Short timings so faults resolve in seconds (see each test for the ones it changes).
FAST = {
    "HERALD_VISIBILITY_TIMEOUT": "1",
    "HERALD_HEARTBEAT": "0.5",
    "HERALD_MAX_ATTEMPTS": "3",
    "HERALD_RETRY_MS": "200",
    "HERALD_LOG_LEVEL": "info",
}


def cluster_env(redis_url: str, **overrides: str) -> dict[str, str]:
    """The environment every process of one test's cluster shares: one Redis, one secret, short timings."""
    return {"REDIS_URL": redis_url, "HERALD_SECRET": TEST_SECRET, **FAST, **overrides}


def _clean_environ() -> dict[str, str]:
    """This process's environment without Herald's variables, so only what a test sets reaches a child."""
    return {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("HERALD_")}


async def eventually(check: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.02) -> None:
    """Wait until ``check()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"within {timeout}s: {what}")
        await asyncio.sleep(interval)


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """:func:`eventually` for a check that has to await (an HTTP probe)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"within {timeout}s: {what}")
        await asyncio.sleep(0.05)


# Worker processes ----------------------------------------------------------------------

class WorkerProcess:
    """One ``python -m herald.worker`` subprocess, its log in a file."""

    def __init__(
        self,
        env: Mapping[str, str],
        settings: str | tuple[str, ...] = "app.chat:chat",
        *,
        concurrency: int = 4,
        # Timeouts
        start_timeout: float = 15.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.env = dict(env)
        self.settings = settings
        """A target for ``python -m herald.worker``, or the arguments of ``herald worker`` (``("--config", path)``)."""
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        log = tempfile.NamedTemporaryFile(prefix="herald-worker-", suffix=".log", delete=False)
        log.close()
        self.log_path = Path(log.name)
        self.names: list[str] = []  # one per start: the worker name its events' source carries

    @property
    def name(self) -> str:
        """The current process's worker name (``<host>-<pid>``, as :class:`herald.worker.Worker` picks it)."""
        return self.names[-1]

    @property
    def source(self) -> str:
        """The CloudEvents ``source`` of the events this worker emits."""
        return f"herald.worker/{self.name}"

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything the worker wrote so far (all its starts)."""
        return self.log_path.read_text(errors="replace")

    def start(self) -> WorkerProcess:
        """Start it and wait for its "started" log line (it has then connected its broker)."""
        if self.alive:
            raise RuntimeError("worker already running")
        target = ["herald.worker", self.settings] if isinstance(self.settings, str) else ["herald", "worker",
                                                                                           *self.settings]
        command = [sys.executable, "-m", *target, "--concurrency", str(self.concurrency)]
        env = {**_clean_environ(), **self.env, "HERALD_LOG_LEVEL": "info"}  # start() waits for an info line
        seen = len(self.log())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.names.append(f"{socket.gethostname()}-{self.process.pid}")
        deadline = time.monotonic() + self.start_timeout
        while "worker.start" not in self.log()[seen:]:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker did not start within {self.start_timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.02)
        return self

    def terminate(self) -> None:
        """Send SIGTERM (a graceful stop) without waiting."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its exit code."""
        assert self.process is not None
        return self.process.wait(self.stop_timeout if timeout is None else timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL if it lingers); the exit code."""
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the worker vanishes mid-job, acknowledging nothing."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(self.stop_timeout)


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# What Redis stored -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Received:
    """One event as a client got it (or as Redis stored it)."""

    topic: str
    cursor: str
    type: str
    event: dict[str, Any]

    @property
    def key(self) -> tuple[int, int]:
        """The cursor as an ordered pair."""
        return parse_cursor(self.cursor)


def stored(client: redis.Redis, topic: str) -> list[Received]:
    """Every entry of a topic's stream (the history and, once full, its sentinel), oldest first.

    Each with the cursor clients get for it: the entry id and the history's epoch.
    """
    entries: Any = client.xrange(f"herald:topic:{{{topic}}}")
    epoch: Any = client.get(f"herald:epoch:{{{topic}}}")
    out = []
    for entry_id, fields in entries:
        doc = orjson.loads(fields[b"event"])
        out.append(Received(topic, join_cursor(entry_id.decode(), epoch and epoch.decode()), doc["type"], doc))
    return out


def token_for(*topics: str) -> str:
    """A subscribe token opening ``topics``."""
    return SIGNER.issue(topics)


def topics_query(topics: list[str]) -> str:
    """``topic=a&topic=b&token=...`` for a multi-topic SSE stream."""
    return "&".join("topic=" + quote(t, safe="/") for t in topics) + "&token=" + token_for(*topics)


# SSE -------------------------------------------------------------------------------------

@dataclass(slots=True)
class SSEMessage:
    """One SSE message: ``event:``, ``id:`` and the decoded ``data:``."""

    event: str
    id: str | None
    data: Any


def parse_sse(buffer: bytes) -> tuple[list[SSEMessage | None], bytes]:
    """Complete blocks of ``buffer`` (``None`` for a heartbeat) and the incomplete rest.

    Herald frames with ``\\n`` only and single-line data, so splitting on blank lines is exact
    (and fast enough for tens of megabytes, unlike a byte-at-a-time parser).
    """
    *blocks, rest = buffer.split(b"\n\n")
    out: list[SSEMessage | None] = []
    for block in blocks:
        fields: dict[str, bytes] = {}
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b": ")
            fields[name.decode()] = value
        if "data" in fields:
            out.append(SSEMessage(fields.get("event", b"message").decode(),
                                  fields["id"].decode() if "id" in fields else None, orjson.loads(fields["data"])))
        elif not fields:
            out.append(None)
    return out, rest


@dataclass(slots=True)
class SSEListener:
    """An SSE client that follows ``topics`` and, when the stream ends or breaks, resumes with its cursor.

    ``bases`` are gateway URLs tried in turn on every reconnect (``bases[0]`` first), as a load
    balancer in front of several gateway processes would. Events are recorded per topic with
    the cursor their slot of the (vector) ``id:`` carries.
    """

    bases: list[str]
    topics: list[str]
    cursor: str | None = None  # the last id: received (a vector cursor when several topics)
    events: dict[str, list[Received]] = field(default_factory=dict)
    controls: list[SSEMessage] = field(default_factory=list)  # herald.gap, herald.disconnect
    timeline: list[str] = field(default_factory=list)  # every message's event: name (and id), in arrival order
    heartbeats: list[float] = field(default_factory=list)  # monotonic times
    # (base, status, Last-Event-ID sent, events received before this connect); status 0: no answer
    connects: list[tuple[str, int, str | None, int]] = field(default_factory=list)
    max_connects: int = 100
    end_on: Callable[[SSEListener], bool] | None = None  # stop for good once this holds
    _task: asyncio.Task[None] | None = None
    _stop: bool = False

    @property
    def all(self) -> list[Received]:
        """Every event received, in arrival order per topic, topics in the order followed."""
        return [r for t in self.topics for r in self.events.get(t, [])]

    def start(self) -> SSEListener:
        """Run in the background."""
        self._task = asyncio.ensure_future(self._run())
        return self

    async def close(self) -> None:
        """Stop and wait."""
        self._stop = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def done(self) -> bool:
        """Whether the listener stopped (``end_on`` held, or it gave up)."""
        return self._task is not None and self._task.done()

    def url(self, base: str) -> str:
        """The stream's URL on one gateway."""
        if len(self.topics) == 1:
            return f"{base}/topics/{quote(self.topics[0], safe='/')}/events?token={token_for(*self.topics)}"
        return f"{base}/topics/events?{topics_query(self.topics)}"

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
            attempt = 0
            while not self._stop and len(self.connects) < self.max_connects:
                base = self.bases[attempt % len(self.bases)]
                attempt += 1
                headers = {"Accept": "text/event-stream"}
                if self.cursor is not None:
                    headers["Last-Event-ID"] = self.cursor
                opened = False
                try:
                    async with client.stream("GET", self.url(base), headers=headers) as response:
                        self.connects.append((base, response.status_code, self.cursor, len(self.all)))
                        opened = True
                        if response.status_code == 200:
                            attempt -= 1  # a stream that opened is retried on the same gateway first
                            await self._read(response)
                            if self.end_on is not None and self.end_on(self):
                                return
                except (httpx.HTTPError, OSError):
                    if not opened:  # a stream that broke after it opened is not another connect
                        self.connects.append((base, 0, self.cursor, len(self.all)))
                await asyncio.sleep(0.2)

    async def _read(self, response: httpx.Response) -> None:
        buffer = b""
        async for chunk in response.aiter_raw():
            messages, buffer = parse_sse(buffer + chunk)
            for message in messages:
                if message is None:
                    self.heartbeats.append(time.monotonic())
                    continue
                self.timeline.append(f"{message.event} {message.id or ''}".strip())
                if message.event.startswith("herald.") and not message.event.startswith("herald.operation."):
                    self.controls.append(message)
                else:
                    self._record(message)
            if self.end_on is not None and self.end_on(self):
                return

    def _record(self, message: SSEMessage) -> None:
        assert message.id is not None, f"an event without id: {message}"
        previous = self.cursor.split(",") if self.cursor is not None else None
        self.cursor = message.id
        slots = message.id.split(",")
        doc = message.data
        topic = self.topics[0] if len(self.topics) == 1 else _topic_of(doc, self.topics, slots, previous)
        cursor = slots[self.topics.index(topic)]
        self.events.setdefault(topic, []).append(Received(topic, cursor, message.event, doc))


async def read_stream(client: httpx.AsyncClient, url: str, topic: str, *, timeout: float = 30.0) -> list[Received]:
    """Every event of one SSE stream that the server ends (an operation's), read to its end."""
    out: list[Received] = []
    buffer = b""
    async with asyncio.timeout(timeout):
        async with client.stream("GET", url, headers={"Accept": "text/event-stream"},
                                 timeout=httpx.Timeout(5.0, read=None)) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            async for chunk in response.aiter_raw():
                messages, buffer = parse_sse(buffer + chunk)
                out += [Received(topic, m.id or "", m.event, m.data) for m in messages if m is not None]
    return out


def _topic_of(doc: dict[str, Any], topics: list[str], slots: list[str], previous: list[str] | None) -> str:
    """The topic of an event on a vector-cursor stream: the one slot that moved since the previous id.

    The first event of a stream opened without a cursor has no previous id; then the event names
    its topic (an operation's correlation id, a room in its data, or a ``topic`` in test data).
    """
    if previous is not None:
        moved = [t for t, c, p in zip(topics, slots, previous, strict=True) if c != p]
        assert len(moved) == 1, f"expected exactly one cursor slot to move, got {moved} for {doc.get('type')}"
        return moved[0]
    data: dict[str, Any] = doc["data"] if isinstance(doc.get("data"), dict) else {}
    for hint in (f"operations/{doc.get('correlationid')}", f"chats/{data.get('room')}", str(data.get("topic"))):
        if hint in topics:
            return hint
    raise AssertionError(f"cannot tell the topic of the first event {doc}")


# WebSocket ---------------------------------------------------------------------------------

@dataclass(slots=True)
class WSListener:
    """A WebSocket client that records events per topic and, if the socket closes, reconnects with cursors."""

    bases: list[str]  # ws:// origins, tried in turn on reconnect
    events: dict[str, list[Received]] = field(default_factory=dict)
    tokens: dict[str, str | None] = field(default_factory=dict)  # topic → token it subscribes with
    messages: list[dict[str, Any]] = field(default_factory=list)  # every non-event message
    timeline: list[str] = field(default_factory=list)  # every message's type (an event's: its event type)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    max_connects: int = 50
    connects: int = 0
    _retries: int = 0
    _ws: ClientConnection | None = None
    _task: asyncio.Task[None] | None = None
    _open: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: bool = False

    def start(self) -> WSListener:
        """Connect and read in the background."""
        self._task = asyncio.ensure_future(self._run())
        return self

    async def connected(self, timeout: float = 10.0) -> None:
        """Wait until the socket is open."""
        async with asyncio.timeout(timeout):
            await self._open.wait()

    async def subscribe(self, topic: str, token: str | None = None) -> None:
        """Follow ``topic`` (from the beginning of an operation; live for a domain topic)."""
        self.tokens[topic] = token or token_for(topic)
        self.events.setdefault(topic, [])
        await self._send_subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop following ``topic`` (what was received stays recorded)."""
        self.tokens.pop(topic, None)
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(orjson.dumps({"type": "unsubscribe", "topic": topic}).decode())

    async def ping(self, ref: str) -> None:
        """Send an application-level ping (answered by the gateway itself, Redis or not)."""
        assert self._ws is not None
        await self._ws.send(orjson.dumps({"type": "ping", "id": ref}).decode())

    async def _send_subscribe(self, topic: str) -> None:
        if self._ws is None:
            return  # subscribed on (re)connect
        got = self.events.get(topic)
        frame: dict[str, Any] = {"type": "subscribe", "topic": topic, "token": self.tokens[topic], "id": topic}
        if got:
            frame["cursor"] = got[-1].cursor
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(orjson.dumps(frame).decode())

    async def close(self) -> None:
        """Close and wait."""
        self._stop = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        attempt = 0
        while not self._stop and self.connects < self.max_connects:
            base = self.bases[attempt % len(self.bases)]
            self.connects += 1
            try:
                async with connect(f"{base}/ws", open_timeout=5, close_timeout=2, compression=None, proxy=None,
                                   max_size=None) as ws:
                    self._ws = ws
                    for topic in list(self.tokens):
                        await self._send_subscribe(topic)
                    self._open.set()
                    async for raw in ws:
                        self._on(orjson.loads(raw))
                    self.closes.append((ws.close_code, ws.close_reason))
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                self.closes.append((None, repr(exc)))
                attempt += 1
            finally:
                self._ws = None
                self._open.clear()
            await asyncio.sleep(0.1)

    def _on(self, doc: dict[str, Any]) -> None:
        if doc.get("type") != "event":
            self.messages.append(doc)
            self.timeline.append(str(doc.get("type")))
            topic = str(doc.get("topic"))
            if doc.get("code") == "broker-unavailable" and topic in self.tokens and self._retries < self.max_connects:
                # the gateway could not reach Redis for this subscribe: ask again shortly, as a client would
                self._retries += 1
                asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(self._send_subscribe(topic)))
            return
        topic = doc["topic"]
        if topic in self.tokens:
            event = doc["event"]
            self.timeline.append(event["type"])
            self.events.setdefault(topic, []).append(Received(topic, doc["cursor"], event["type"], event))


# Checks --------------------------------------------------------------------------------------

def in_order_once(received: list[Received]) -> list[str]:
    """Problems with a topic's received events: a cursor repeated or out of order (empty: none)."""
    problems = []
    for before, after in itertools.pairwise(received):
        if after.key <= before.key:
            problems.append(f"{after.topic}: {after.cursor} ({after.type}) came after {before.cursor}")
    return problems


async def run_bounded(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run ``jobs`` with at most ``limit`` at once; their results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


# A thousand operations ------------------------------------------------------------------------

OPERATION_EVENTS = ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]
"""What a chat operation's topic holds, in order, when nothing goes wrong."""


async def a_thousand_operations(
    a: HeraldServer, b: HeraldServer, workers: list[WorkerProcess], rooms: list[str],
    history_of: Callable[[str], list[Received]], *, operations: int = 1000, clients: int = 10,
    per_client_in_flight: int = 5,
) -> dict[str, str]:
    """Post ``operations`` chat messages to gateway ``a`` and check every client got every event once, in order.

    Each operation is followed over SSE on ``b`` (its ``subscribe_url``, read to the end of the
    stream) and over a WebSocket on ``a`` (one of ``clients``, subscribed with the token of its
    ``websocket_url``); one multiplexed SSE stream on ``b`` follows every room. At most
    ``clients * per_client_in_flight`` operations are in flight at once. ``history_of(topic)`` is a
    topic's history as the broker holds it: what each client must have received, to the letter.
    Asserts that, that each operation was started once and handled by exactly one of ``workers``
    (each of which handled some), and that the room stream never had to reconnect. Returns each
    operation's topic with its room, for the caller's checks of its own setup.
    """
    room_listener = SSEListener([b.url], rooms).start()
    sockets = [WSListener([a.ws_url]).start() for _ in range(clients)]
    for ws in sockets:
        await ws.connected()
    await eventually(lambda: bool(room_listener.connects), 10, "the room stream opened")

    sse_got: dict[str, list[Received]] = {}
    room_of: dict[str, str] = {}
    limits = httpx.Limits(max_connections=2 * clients * per_client_in_flight)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as http:

        async def operation(n: int) -> None:
            client = n % clients
            room = rooms[n % len(rooms)]
            response = await http.post(f"{a.url}/{room}/messages", json={"author": f"c{client}", "text": f"#{n}"})
            assert response.status_code == 202, response.text
            body: dict[str, Any] = response.json()
            topic = f"operations/{body['id']}"
            room_of[topic] = room
            ws = sockets[client]
            await ws.subscribe(topic, parse_qs(urlsplit(body["websocket_url"]).query)["token"][0])
            sse_got[topic] = await read_stream(http, b.url + body["subscribe_url"], topic)
            await eventually(lambda: len(ws.events[topic]) >= len(OPERATION_EVENTS), 30, f"{topic} over the WebSocket")
            await ws.unsubscribe(topic)

        jobs: list[Callable[[], Awaitable[None]]] = [functools.partial(operation, n) for n in range(operations)]
        await run_bounded(jobs, clients * per_client_in_flight)

    await eventually(lambda: sum(len(v) for v in room_listener.events.values()) >= operations, 30,
                     "every ChatMessageDelivered on the room stream")
    await asyncio.sleep(0.3)  # anything more (a duplicate) would arrive now
    await room_listener.close()
    for ws in sockets:
        await ws.close()

    handled_by: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    for topic in room_of:
        history = history_of(topic)
        ws_got = next(ws.events[topic] for ws in sockets if topic in ws.events)
        expected = [(e.cursor, e.type, e.event["id"]) for e in history]
        if [e.type for e in history] != OPERATION_EVENTS:
            problems.append(f"{topic} stored {[e.type for e in history]}")
        if [(e.cursor, e.type, e.event["id"]) for e in sse_got[topic]] != expected:
            problems.append(f"{topic}: SSE on B got {[e.cursor for e in sse_got[topic]]}, stored {expected}")
        if [(e.cursor, e.type, e.event["id"]) for e in ws_got] != expected:
            problems.append(f"{topic}: WebSocket on A got {[e.cursor for e in ws_got]}, stored {expected}")
        running = [e for e in history if e.type == "herald.operation.running"]
        if [e.event["data"]["attempts"] for e in running] != [1]:
            problems.append(f"{topic} was started {[e.event['data']['attempts'] for e in running]} times")
        handled_by.update(e.event["source"] for e in history if e.type == "ChatMessageDelivered")
    assert not problems, f"{len(problems)} problems, first ones: {problems[:5]}"

    # exactly one worker per operation: one delivery each, by one of the worker processes
    assert sum(handled_by.values()) == operations
    assert set(handled_by) <= {w.source for w in workers}, handled_by
    print(f"operations handled per worker: {dict(handled_by)}")
    assert all(handled_by[w.source] > 0 for w in workers), f"one worker got nothing: {handled_by}"

    # the multiplexed room stream on B: every delivery once, in each room's stored order
    for room in rooms:
        got = room_listener.events.get(room, [])
        assert not in_order_once(got), in_order_once(got)[:3]
        assert [(e.cursor, e.event["id"]) for e in got] == [(e.cursor, e.event["id"]) for e in history_of(room)]
        assert sorted(e.event["correlationid"] for e in got) == sorted(
            t.removeprefix("operations/") for t, r in room_of.items() if r == room)
    assert [c[1] for c in room_listener.connects] == [200], "the room stream never had to reconnect"
    return room_of


# One test's cluster ------------------------------------------------------------------------

class Cluster:
    """One test's own Redis, gateway processes and worker processes; :meth:`close` ends them all."""

    def __init__(self, *, appendonly: bool = False, redis_args: tuple[str, ...] = (), **env: str) -> None:
        self.redis = RedisServer(appendonly=appendonly)
        self.redis_args = redis_args
        self.redis.start(*redis_args)
        self.env = cluster_env(self.redis.url(), **env)
        self.gateways: list[HeraldServer] = []
        self.workers: list[WorkerProcess] = []

    def client(self) -> redis.Redis:
        """A synchronous client of the cluster's Redis, for set-up and assertions."""
        return self.redis.client()

    async def gateway(self, **env: str) -> HeraldServer:
        """Start one more gateway process (``env`` on top of the cluster's)."""
        server = HeraldServer({**self.env, **env})
        self.gateways.append(server)
        return await asyncio.to_thread(server.start)

    async def worker(self, settings: str = "app.chat:chat", *, concurrency: int = 4,
                     **env: str) -> WorkerProcess:
        """Start one more worker process."""
        worker = WorkerProcess({**self.env, **env}, settings, concurrency=concurrency)
        self.workers.append(worker)
        return await asyncio.to_thread(worker.start)

    async def restart_redis(self, *, down: float = 0.0, kill: bool = True) -> None:
        """Crash (SIGKILL) or stop Redis, stay down ``down`` seconds, start it again on the same port and files."""
        await asyncio.to_thread(self.redis.kill if kill else self.redis.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.redis.start, *self.redis_args)

    def logs(self, chars: int = 3000) -> str:
        """The end of every process's log, for a failing test's output."""
        parts = [f"--- redis :{self.redis.port}\n{self.redis.log_tail()}"]
        parts += [f"--- gateway :{g.port}\n{g.log()[-chars:]}" for g in self.gateways]
        parts += [f"--- worker {w.names}\n{w.log()[-chars:]}" for w in self.workers]
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every process this cluster started (workers first, Redis last)."""
        for worker in self.workers:
            worker.stop()
        for gateway in self.gateways:
            gateway.stop()
        self.redis.cleanup()
