"""Auto-pipelining: every command a process issues in one event-loop turn goes to Redis in one write.

A gateway serving many requests at once, or a worker running many handlers, issues its Redis calls
from many coroutines. Sent one by one through a connection pool, each call paid for a connection
taken and given back, a timer for its timeout, a write system call and a wake-up for its reply:
more CPU than the command itself costs Redis (39% of a worker's samples were in the write alone).
:class:`AutoPipeline` keeps one connection instead. A call packs its command into an outbox and
awaits a future; one sender writes whatever the outbox holds in a single write, once per loop turn
(and again for what came while it wrote), and one reader resolves the futures in order as the replies
come, several per read. Nothing is held back waiting for company: a lone command goes out in the
same turn it was issued.

Only plain request/reply commands may go through it: a blocking command (``XREADGROUP BLOCK``)
would hold up every reply behind it, and ``MULTI`` would take the other callers' commands into its
transaction. Replies are RESP2 as parsed by redis-py (bytes, integers, lists); an error reply fails
only its own call, with redis-py's exception class (``NoScriptError``, ``ResponseError``, …).

Failures: the connection is made by redis-py (so ``rediss://``, ``unix://``, credentials and the
database number work as for the pool) and bounded by the timeout. When it breaks, or no reply comes
for ``timeout`` seconds while calls wait (one timer per connection, re-armed only when it fires, not
one per command), every waiting call fails with redis-py's ``ConnectionError`` or ``TimeoutError`` and
the next call connects again. A call whose reply was lost is never sent twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("herald.broker.redis")

Arg = str | bytes | int | float


def pack(args: Sequence[Arg]) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings (hiredis packs it, in C)."""
    return hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # its stub types a tuple of one item


class AutoPipeline:
    """One Redis connection on which the commands of a loop turn are written together (see the module docstring)."""

    def __init__(self, connection: Callable[[], AbstractConnection], *, timeout: float) -> None:
        self._new_connection = connection
        """Makes an unconnected redis-py connection; it must have no socket timeout (the timer below is the timeout)."""
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._outbox: list[bytes] = []
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._retired: set[asyncio.Task[Any]] = set()  # the reader and disconnect of connections given up
        self._progress = 0.0  # loop time of the last reply, or of the first call after an idle spell
        self.writes = 0
        """Writes made so far (each carries every command issued since the one before): for tests and metrics."""
        self.commands = 0
        """Commands sent so far."""

    async def execute(self, *args: Arg) -> Any:
        """Send one command with those of this loop turn and return its reply (an error reply is raised)."""
        conn = self._conn if self._conn is not None else await self._connect()
        return await self._enqueue(conn, pack(args))

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send several commands in the same write; their replies in order, an error reply as its exception.

        A broken connection fails them all (raised).
        """
        conn = self._conn if self._conn is not None else await self._connect()
        futures = [self._enqueue(conn, pack(args)) for args in commands]
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
                raise reply
        return replies

    def _enqueue(self, conn: AbstractConnection, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._waiting:
            self._progress = loop.time()
        self._waiting.append(future)
        self._outbox.append(packed)
        self.commands += 1
        if self._sender is None:
            self._sender = loop.create_task(self._send(conn))
        if self._timer is None:
            self._timer = loop.call_later(self._timeout, self._check)
        return future

    async def script(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` of a registered script; loaded first if Redis lost it (it then ran nothing)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            source = script.script
            await self.execute("SCRIPT", "LOAD", source if isinstance(source, (str, bytes)) else bytes(source))
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        """Close the connection; calls still waiting fail."""
        if self._conn is not None:
            self._fail(self._conn, RedisConnectionError("the broker is closing"))
        if self._retired:
            await asyncio.wait(self._retired, timeout=self._timeout)

    async def _connect(self) -> AbstractConnection:
        async with self._lock:
            if self._conn is not None:
                return self._conn
            conn = self._new_connection()
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.connect()
            except TimeoutError:
                await conn.disconnect(nowait=True)
                raise RedisTimeoutError("timed out connecting to Redis") from None
            self._conn = conn
            self._reader = asyncio.get_running_loop().create_task(self._read(conn), name="redis-autopipeline")
            return conn

    async def _send(self, conn: AbstractConnection) -> None:
        try:
            while self._outbox and conn is self._conn:
                batch, self._outbox = self._outbox, []
                self.writes += 1
                await conn.send_packed_command(batch, check_health=False)
        except Exception as exc:  # whatever broke the write broke the connection: every waiting call fails
            self._fail(conn, exc)
        finally:
            self._sender = None
            if self._outbox and self._conn is not None:  # calls for a new connection came while this one died
                self._sender = asyncio.get_running_loop().create_task(self._send(self._conn))

    async def _read(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        try:
            while True:
                try:
                    reply: Any = await conn.read_response()
                except ResponseError as exc:  # an error reply: this command's, not the connection's
                    reply = exc
                self._progress = loop.time()
                future = waiting.popleft()  # IndexError: a reply nobody asked for, a broken stream
                if future.done():
                    continue  # its caller was cancelled; the reply is consumed all the same, in order
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(conn, exc)

    def _check(self) -> None:
        """The timeout: fail the connection when calls have waited ``timeout`` seconds without any reply."""
        self._timer = None
        if not self._waiting or self._conn is None:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._progress
        if quiet >= self._timeout:
            self._fail(self._conn, RedisTimeoutError(f"no reply from Redis for {quiet:.1f} s"))
        else:
            self._timer = loop.call_later(self._timeout - quiet, self._check)

    def _fail(self, conn: AbstractConnection, exc: BaseException) -> None:
        if conn is not self._conn:
            return  # that connection was given up already
        self._conn = None
        reader, self._reader = self._reader, None
        retired = [asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))]
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            retired.append(reader)
        for task in retired:
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = exc if isinstance(exc, (RedisConnectionError, RedisTimeoutError)) else RedisConnectionError(
            f"the Redis connection broke: {exc!r}")
        waiting, self._waiting = self._waiting, collections.deque()
        self._outbox = []
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        if waiting:
            log.debug("auto-pipeline connection lost with %d calls waiting: %s", len(waiting), error)
