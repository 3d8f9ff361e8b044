"""Calls to a Redis Cluster, each sent to the master that serves its key, replies as Redis sends them.

:class:`NodeCalls` is what :class:`herald.broker.cluster.ClusterBroker` gives the RedisBroker
code it inherits in place of the one connection to one Redis (``RedisBroker._pipe``):
``execute``, ``execute_many`` and ``script`` return raw RESP2 replies (no redis-py reply
callbacks), an error reply as its exception. It also runs what redis-py's ``RedisCluster`` cannot:
several commands in one write on ONE connection of one master (a write and the ``WAIT`` that
must follow it on the same connection), and a blocking ``XREADGROUP`` whose connection is known
by its ``CLIENT ID``, so another connection can ``CLIENT UNBLOCK`` it.

Redirections are followed as redis-py does: ``MOVED`` updates the slot map and sends again (the
command was not run), ``ASK`` sends it once to the importing node after ``ASKING``, ``TRYAGAIN``
(a multi-key command while a slot's keys are half moved) waits 50 ms and sends again. A broken
connection is never written to twice: the error goes up (``BrokerUnavailable`` in the broker) and
the slot map is read again before the next call, so a promoted replica is found.

The plain calls of a loop turn go to each master through one auto-pipelined connection
(:class:`herald.broker.pipeline.AutoPipeline`, as on one Redis): one write per master per turn.
What must have a connection to itself (``run(..., pooled=True)``: a write followed by ``WAIT``,
which would hold up every call queued behind it, or a write whose connection must be known to
have never been made) takes one of the node's pool, waiting for one of ``limit`` turns shared with
the broker's RedisCluster client (a burst waits instead of failing with ``MaxConnectionsError``).
Blocking reads have connections of their own, each with its ``CLIENT ID`` asked once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from herald.broker.pipeline import AutoPipeline
from herald.broker.slots import key_slot

log = logging.getLogger("herald.broker.cluster")

Arg = str | bytes | int | float
Command = Sequence[Arg]

_REDIRECTS = 8  # MOVED / ASK / TRYAGAIN followed at most this many times per call
_TRYAGAIN_PAUSE = 0.05
_REFRESH_EVERY = 0.2  # seconds between two reads of the slot map at most


class NotSent(RedisConnectionError):
    """The connection could not be made: the commands were never sent (so sending them again is safe)."""


_UNSENT: dict[Any, Any] = {}


def _reporting_unsent(cls: Any) -> Any:
    """``cls`` whose ``connect`` raises :class:`NotSent` when the connection cannot be made (so an auto-pipelined
    call to a dead master is known to have gone nowhere); made once per connection class."""
    made = _UNSENT.get(cls)
    if made is None:

        class Connection(cls):
            async def connect(self) -> None:
                try:
                    await super().connect()
                except RedisConnectionError as exc:
                    raise NotSent(str(exc)) from exc

        made = _UNSENT[cls] = Connection
    return made


def command_key(args: Command) -> Arg:
    """The key a command is routed by: the first key of EVAL/EVALSHA, the first stream of XREAD(GROUP), else
    the first argument."""
    name = _bytes(args[0]).decode().upper()
    if name in ("EVALSHA", "EVAL"):
        if int(args[2]) < 1:
            raise ValueError(f"{name} without a key cannot be routed")
        return args[3]
    if name in ("XREADGROUP", "XREAD"):
        position = next(i for i, a in enumerate(args) if _bytes(a).upper() == b"STREAMS")
        return args[position + 1]
    return args[1]


class NodeCalls:
    """Raw calls routed by slot to the masters of a Redis Cluster (see the module docstring)."""

    def __init__(self, cluster: RedisCluster, gate: asyncio.Semaphore, *, timeout: float) -> None:
        self._cluster = cluster
        self._gate = gate
        self._timeout = timeout
        self._pipes: dict[str, AutoPipeline] = {}
        self._blockers: dict[str, list[tuple[AbstractConnection, int]]] = {}  # idle blocking connections, per node
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # Topology ----------------------------------------------------------------------------
    async def node(self, slot: int) -> ClusterNode:
        """The master serving ``slot`` as the slot map says now (read once, and again after a failure)."""
        await self._cluster.initialize()
        return self._cluster.nodes_manager.get_node_from_slot(slot)

    async def moved(self, error: MovedError) -> None:
        """Take a ``MOVED`` reply's word for who serves its slot now."""
        await self._cluster.nodes_manager.move_slot(error)

    async def refresh(self) -> None:
        """Read the slot map again (at most every 0.2 s; callers in between share the read under way)."""
        if self._refreshing is None:
            if time.monotonic() - self._refreshed < _REFRESH_EVERY:
                return
            self._refreshing = asyncio.ensure_future(self._refresh())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._refreshing = None

    def refresh_soon(self) -> None:
        """:meth:`refresh` in the background (a call failed: its master may be gone)."""
        task = asyncio.ensure_future(self.refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self) -> None:
        try:
            await self._cluster.initialize()
            await self._cluster.nodes_manager.initialize()
        except Exception as exc:  # no node answers: the next call fails as unavailable and looks again
            log.debug("could not read the cluster's slot map: %s", exc)
        finally:
            self._refreshed = time.monotonic()

    def pipe(self, node: ClusterNode) -> AutoPipeline:
        """The auto-pipelined connection to ``node``."""
        pipe = self._pipes.get(node.name)
        if pipe is None:
            unsent = _reporting_unsent(node.connection_class)
            pipe = self._pipes[node.name] = AutoPipeline(
                lambda: unsent(**{**node.connection_kwargs, "socket_timeout": None}), timeout=self._timeout)
        return pipe

    # Calls --------------------------------------------------------------------------------
    async def execute(self, *args: Arg) -> Any:
        """One command; its raw reply (an error reply is raised)."""
        [reply] = await self.run(command_key(args), [args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Commands of any slots, one write per master; their replies in order, an error reply as its exception.

        Commands of one key keep their order (they go to one master, in one write).
        """
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, command in enumerate(commands):
            node = await self.node(key_slot(_bytes(command_key(command))))
            by_node.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(commands)

        async def on(node: ClusterNode, positions: list[int]) -> None:
            try:
                got = await self.pipe(node).execute_many([commands[i] for i in positions])
            except Exception as exc:  # this master is unreachable: its commands fail, the others' stand
                self.refresh_soon()
                got = [exc] * len(positions)
            for i, reply in zip(positions, got, strict=True):
                replies[i] = reply

        await asyncio.gather(*(on(node, positions) for node, positions in by_node.values()))
        for i, reply in enumerate(replies):  # redirected: not run; send again, one by one, in order
            if isinstance(reply, (AskError, TryAgainError)):  # MovedError is an AskError
                try:
                    [replies[i]] = await self.run(command_key(commands[i]), [commands[i]])
                except Exception as exc:
                    replies[i] = exc
        return replies

    async def script(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` of ``script`` on the master of ``keys``, loading it there first if that master lacks it."""
        return await self.execute_script(script, keys, args)

    async def execute_script(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg],
                             *, then: Sequence[Command] = (), pooled: bool = False, extra: float = 0.0) -> Any:
        """:meth:`script`, and ``then`` on the same connection right after it (``WAIT``: ``pooled``); the script's
        reply and theirs when ``then`` is given."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        for _ in range(2):
            replies = await self.run(keys[0], [command, *then], pooled=pooled, extra=extra)
            if isinstance(replies[0], NoScriptError):
                # a master that lost its scripts (a restart, a promoted replica that never had them)
                await self.run(keys[0], [("SCRIPT", "LOAD", _bytes(script.script))])
                continue
            if isinstance(replies[0], Exception):
                raise replies[0]
            return replies if then else replies[0]
        raise NoScriptError("the script could not be loaded")

    async def run(self, key: Arg, commands: Sequence[Command], *, pooled: bool = False,
                  extra: float = 0.0) -> list[Any]:
        """``commands`` (all of ``key``'s slot) in one write to the master that serves the slot: on its
        auto-pipelined connection, or (``pooled``) on a connection of its pool taken for them alone.

        Their replies in order, error replies as exceptions. A redirection of the first command (which means
        none of them ran there) sends them all again where the cluster says. On a pooled connection that
        could not even be made, they are sent once more if the slot map now names another master.
        """
        slot = key_slot(_bytes(key))
        asking: ClusterNode | None = None
        replies: list[Any] = []
        unsent_until: float | None = None
        for _ in range(_REDIRECTS + 10):
            if asking is not None:
                node = asking
                sent: list[Command] = [c for command in commands for c in (("ASKING",), command)]
            else:
                node = await self.node(slot)
                sent = list(commands)
            try:
                replies = await (self.on_node(node, sent, extra=extra) if pooled
                                 else self.pipe(node).execute_many(sent))
            except NotSent:
                # the master is gone. Nothing was sent, so nothing can run twice: for up to a second, read the slot
                # map again (the nodes learn of a failover a moment apart) and send where it says, if it moved on
                now = time.monotonic()
                unsent_until = unsent_until or now + min(1.0, self._timeout)
                if now > unsent_until:
                    raise
                await self.refresh()
                if await self.node(slot) is node:
                    await asyncio.sleep(_REFRESH_EVERY)
                continue
            except Exception:
                self.refresh_soon()  # the master may be gone: find who serves its slots now
                raise
            if asking is not None:
                replies = replies[1::2]
            asking = None
            first = replies[0]
            if isinstance(first, MovedError):
                await self.moved(first)
                continue
            if isinstance(first, AskError):
                asking = self._cluster.nodes_manager.get_node(host=first.host, port=first.port) or ClusterNode(
                    first.host, first.port, **self._cluster.nodes_manager.connection_kwargs)
                continue
            if isinstance(first, TryAgainError):
                await asyncio.sleep(_TRYAGAIN_PAUSE)
                continue
            if isinstance(first, ClusterDownError):
                self.refresh_soon()  # a failover under way: the slot map changes soon
            return replies
        return replies

    async def on_node(self, node: ClusterNode, commands: Sequence[Command], *, extra: float = 0.0) -> list[Any]:
        """``commands`` in one write on one connection of ``node``; replies in order, error replies as exceptions.

        Each reply may take the socket timeout and ``extra`` seconds (a ``WAIT`` among them)."""
        async with self._gate:
            conn = node.acquire_connection()
            try:
                if not conn.is_connected:
                    try:
                        await conn.connect()
                    except RedisConnectionError as exc:
                        raise NotSent(str(exc)) from exc
                await conn.send_packed_command(conn.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response(timeout=self._timeout + extra))
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
            except BaseException:
                await conn.disconnect(nowait=True)  # a reply may be half read: never reuse this connection
                raise
            finally:
                node.release(conn)

    async def blocking(self, key: Arg, command: Command, client_id: asyncio.Future[tuple[ClusterNode, int]], *,
                       timeout: float) -> Any:
        """A blocking ``command`` on the master of ``key``, its reply awaited up to ``timeout`` s; ``client_id`` gets
        (the node, the connection's ``CLIENT ID``) as soon as it is known, for :meth:`unblock`. Its raw reply (an
        error reply is raised). The connection is one kept for blocking reads, its id asked once."""
        node = await self.node(key_slot(_bytes(key)))
        idle = self._blockers.setdefault(node.name, [])
        conn: AbstractConnection | None = None
        try:
            if idle:
                conn, number = idle.pop()
            else:
                conn = node.connection_class(**node.connection_kwargs)
                await conn.connect()
                await conn.send_packed_command(conn.pack_command("CLIENT", "ID"))
                try:
                    number = int(await conn.read_response())
                except ResponseError:  # CLIENT ID not allowed (a managed service): it cannot be unblocked
                    number = -1
            client_id.set_result((node, number))
            await conn.send_packed_command(conn.pack_command(*command))
            reply = await conn.read_response(timeout=timeout)
        except ResponseError:
            assert conn is not None
            idle.append((conn, number))  # the reply was read whole: the connection is fine
            raise
        except BaseException:
            if conn is not None:
                await conn.disconnect(nowait=True)
            self.refresh_soon()
            raise
        finally:
            if not client_id.done():
                client_id.cancel()
        idle.append((conn, number))
        return reply

    async def unblock(self, client_id: asyncio.Future[tuple[ClusterNode, int]]) -> None:
        """End the blocking call that ``client_id`` belongs to as if its timeout had come (``CLIENT UNBLOCK``)."""
        try:
            node, number = await asyncio.wait_for(asyncio.shield(client_id), 1.0)
        except (TimeoutError, asyncio.CancelledError):
            return  # never sent, or over already
        if number >= 0:
            await self.on_node(node, [("CLIENT", "UNBLOCK", number, "TIMEOUT")])

    async def close(self) -> None:
        """Close the auto-pipelined and blocking connections (the pools are the cluster client's)."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        for pipe in self._pipes.values():
            await pipe.close()
        for idle in self._blockers.values():
            for conn, _ in idle:
                await conn.disconnect(nowait=True)
        self._pipes.clear()
        self._blockers.clear()


def _bytes(value: Arg | memoryview) -> bytes:
    if isinstance(value, memoryview):
        return value.tobytes()
    return value if isinstance(value, bytes) else str(value).encode()
