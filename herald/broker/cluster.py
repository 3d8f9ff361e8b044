"""ClusterBroker: the RedisBroker's design on a Redis Cluster (``REDIS_URL=redis+cluster://host:port[,host:port…]``).

Keys are the RedisBroker's (:mod:`herald.broker.redis`; every one carries a hash tag), so a topic's
stream, its epoch and its channel share the slot of ``{<topic>}``, and an operation's hash and its
topic's stream and epoch share the slot of ``{operations/<id>}``. What differs::

    herald:req:{<type>#<k><3 chars>}  stream   the k-th of HERALD_REDIS_SHARDS request streams of an event
                                               type (slots.shard_tags: spread evenly over the slots);
                                               entries: event (request JSON), op (the operation's record,
                                               JSON), exp (its expiry, unix ms), idem (its idempotency key)
    herald:idem:{<idempotency key>}   hash     op, fp, and at (unix ms when it was reserved); PEXPIREAT exp.
                                               An operation accepted with a key gets an id made to land in
                                               the key's slot (Broker.operation_id, slots.operation_id_in_slot),
                                               so the record, the operation and its topic share that slot.

Every script touches the keys of one slot. Three steps touch two slots, and keep their promises so:

* **Accepting a command** writes the request (the shard's slot) and the operation (its own):

  1. with an ``Idempotency-Key``, reserve the key for this operation (the operation's slot): a key
     already reserved answers with its operation, or ``409`` while that operation is not stored yet
     and was reserved less than an accept's longest duration (the *grace*) ago: it may still be on
     its way. Past that, this request takes the reservation over, in one script that checks the
     other operation still does not exist;
  2. ``XADD`` the request to a shard, carrying the operation's record (and ``WAIT``, when asked);
  3. create the operation unless it exists, or its key now names another operation (and ``WAIT``);
     the script only creates what is missing, so it is sent again while the operation's master
     cannot be reached, for up to the socket timeout (a failover under way).

  ``202`` only after all three. The request is the source of truth: an operation exists only once its
  request was queued. A worker that takes a request whose operation is missing looks again until
  the request is older than the grace (its accept may still store it, or undo itself), then creates
  it from the record the request carries, by the step-3 script (:meth:`ClusterBroker.get_operation`),
  unless it expired or its key was taken over. When step 2 or 3 fails after the request may have
  gone out, the accept undoes itself before it answers ``503``: the operation is stored as failed
  (``not-accepted``) unless a worker started it already, and the key is freed, so the request is
  dropped unrun and the client's retry starts afresh. A request never sent (the connection could
  not be made) needs no undoing; the key is freed. So a failure between the steps leaves no orphan
  and no ``202`` for work that is not done; a ``503`` may still stand for work done when the undoing
  itself cannot reach the operation's master (a lost reply does as much on one Redis), and a retry
  with the same ``Idempotency-Key`` then finds that operation.
* **Ending an operation with its events** (``transition(..., events=..., ack=...)``): events for the
  operation's own topic ride in the update script with the status event, as on one Redis; events for
  other topics are published first (each append-and-SPUBLISH atomic, one write per master), after the
  stored operation was read and the move found legal (unless the caller's copy is exactly what this
  process last stored, a worker's own, and the operation cannot have expired since), then the
  operation is updated (version
  checked; a stale read is read again, the events are not published twice), then the request is
  acknowledged. A crash in between publishes an event twice at worst (the request is handed out
  again), never loses one; a move found illegal only after the events went out (a racing end)
  leaves them published.
* **Acknowledging** happens after the move that ends the operation; if it fails, the request is
  handed out again and finds the operation ended.

Request streams are sharded: an event type has ``shards`` streams (``HERALD_REDIS_SHARDS``), accepts
take them in turn, and ``consume`` reads them all: reclaims (XAUTOCLAIM, concurrently), then what
this consumer's blocking reads brought, then a non-blocking read of the shards without one (``count``
entries spread over them from a rotating start), then it waits on a blocking read armed on every
shard; those reads stay armed between calls (:mod:`herald.broker.reads`). Whatever came beyond
``count`` is given back (idle for a year, its delivery count as it was), for the next reclaim
anywhere. Redelivery and dead-lettering are the RedisBroker's. A first delivery carries the
operation as accepted, so a worker moves it to ``running`` without reading it (a move that finds it
missing waits for it, or creates it, as :meth:`ClusterBroker.get_operation` does).

Fan-out is sharded pub/sub (:mod:`herald.broker.sharded`): the append script ``SPUBLISH``-es, and each
process holds one connection per master that serves a topic it follows.

``wait_replicas`` (``HERALD_REDIS_WAIT_REPLICAS``): steps 2 and 3 are each followed, on the same
connection, by ``WAIT n wait_timeout``; fewer confirmations than ``n`` is a ``503`` (undone as above).
Each process remembers (``ROLE``, asked again every second while it matters) which masters lack
their replicas: commands without a key get operation ids and request shards elsewhere, and a
command that needs such a master is refused before anything is written. Without it, a failover can
lose what the master acknowledged but had not replicated yet: a queued request (its operation then
stays ``pending`` until its TTL), an operation's last moves and events, a reservation. See
docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from herald.broker import slots
from herald.broker.base import (
    Accepted,
    BrokerUnavailable,
    Delivery,
    IdempotencyConflict,
    IdempotencyInProgress,
    OperationNotFound,
)
from herald.broker.nodes import NodeCalls, NotSent
from herald.broker.reads import ArmedReads
from herald.broker.redis import (
    _CAS_ATTEMPTS,
    _LONG_IDLE_MS,
    _RELEASED,
    GROUP,
    RedisBroker,
    _fields,
    _key,
    _ms,
    _op_key,
    _reachable,
    _text,
    _topic_keys,
)
from herald.broker.sharded import ShardedFanout
from herald.events import Event, EventError, decode_event
from herald.operations import (
    IllegalTransition,
    Operation,
    Status,
    new_operation_id,
    operation_topic,
    problem,
    transition,
)

log = logging.getLogger("herald.broker.cluster")

SCHEMES = ("redis+cluster://", "rediss+cluster://")
_CARRIED_MAX = 10_000  # operations' records kept from the requests handed out and not settled yet

# KEYS: idempotency record. ARGV: operation id, fingerprint, expiry (unix ms).
_RESERVE_LUA = """
local seen = redis.call('HMGET', KEYS[1], 'op', 'fp', 'at')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if seen[1] then
  if seen[2] ~= ARGV[2] then return {'conflict', seen[1]} end
  if seen[1] == ARGV[1] then return {'reserved'} end
  return {'exists', seen[1], now - tonumber(seen[3])}
end
redis.call('HSET', KEYS[1], 'op', ARGV[1], 'fp', ARGV[2], 'at', now)
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {'reserved'}
"""

# KEYS: idempotency record, the operation it names. ARGV: that operation's id, the new operation's id, fingerprint,
# expiry (unix ms), grace ms. The reservation passes to the new operation only if it still names the old one, the old
# one was never stored, and it was made more than the grace ago.
_TAKEOVER_LUA = """
local seen = redis.call('HMGET', KEYS[1], 'op', 'at')
if seen[1] ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 then return 'changed' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(seen[2]) < tonumber(ARGV[5]) then return 'young' end
redis.call('HSET', KEYS[1], 'op', ARGV[2], 'fp', ARGV[3], 'at', now)
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 'reserved'
"""

# KEYS: operation hash[, its idempotency record]. ARGV: operation id, expiry (unix ms), fields...
# Run by the gateway after the request is queued, and by a worker that finds the operation missing.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if KEYS[2] and redis.call('HGET', KEYS[2], 'op') ~= ARGV[1] then return 'superseded' end
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= tonumber(ARGV[2]) then return 'expired' end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 'created'
"""


# KEYS: idempotency record. ARGV: operation id. Frees the key reserved for an operation whose request was never sent.
_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'op') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: operation hash[, its idempotency record]. ARGV: operation id, expiry (unix ms), the failed record's fields...
# After an accept failed once its request may be queued: the operation is stored failed (if a worker has not started
# it), so the worker that takes the request drops it, and the key is free for the client's retry.
_VOID_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'status')
if cur[1] and (cur[1] ~= '1' or cur[2] ~= 'pending') then return 'started' end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
if KEYS[2] and redis.call('HGET', KEYS[2], 'op') == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 'voided'
"""


def sharded_script(source: str | bytes | memoryview) -> str:
    """A RedisBroker script for a Cluster: its ``PUBLISH`` made ``SPUBLISH`` (the channel is in the keys' slot)."""
    text = bytes(source).decode() if not isinstance(source, str) else source
    return text.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``redis+cluster://[user:password@]host:port[,host:port…][?option=…]``: the seed nodes, the first seed's
    ``redis://`` (or ``rediss://``) URL, and the connection options redis-py reads from that URL."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    rest, _, query = rest.partition("?")
    userinfo, _, hosts = rest.split("/", 1)[0].rpartition("@")
    seeds: list[tuple[str, int]] = []
    for part in filter(None, hosts.split(",")):
        host, colon, port = part.rpartition(":")
        if not colon or "]" in port:  # no port given (or an IPv6 address without one)
            host, port = part, "6379"
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise ValueError(f"no host in {url!r}; use redis+cluster://host:port[,host:port…]")
    single = (f"{scheme.removesuffix('+cluster')}://{userinfo + '@' if userinfo else ''}"
              f"{seeds[0][0]}:{seeds[0][1]}" + (f"?{query}" if query else ""))
    options: dict[str, Any] = dict(parse_url(single))
    for name in ("host", "port", "db", "path"):
        options.pop(name, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return seeds, single, options


class ReplicasMissing(BrokerUnavailable):
    """``WAIT`` found fewer replicas holding a write than ``HERALD_REDIS_WAIT_REPLICAS`` asks for."""


class _GatedCluster(RedisCluster):
    """A RedisCluster whose calls wait for one of the broker's turns, instead of failing with MaxConnectionsError
    when a burst of calls (thousands of subscribers at once) finds a node's connections all taken."""

    gate: asyncio.Semaphore

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.gate:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise ValueError("shard_hint is not supported in cluster mode")
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]  # as RedisCluster.pipeline builds one


class _GatedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client: Any = self.cluster_client
        async with client.gate:
            return await super().execute(raise_on_error, allow_redirections)


class ClusterBroker(RedisBroker):
    """The RedisBroker on a Redis Cluster: one slot per script, sharded request streams, sharded pub/sub."""

    def __init__(
        self,
        url: str,
        *,
        shards: int = 4,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        accept_grace: float | None = None,
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        max_connections: int = 64,
        **options: Any,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        seeds, single, connection = parse_cluster_url(url)
        # The RedisBroker's state and settings; its client for one Redis (never connected) is replaced below.
        super().__init__(single, connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                         max_connections=max_connections, **options)
        self.shards = shards
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        # Longest an accept may take (each step bounded by the socket timeout, WAIT by its own): a reservation
        # older than this whose operation was never stored is taken over by a retry, and a worker creates the
        # missing operation of a request older than this.
        if accept_grace is None:
            accept_grace = 3 * socket_timeout + (wait_timeout if wait_replicas else 0.0) + 1.0
        self._grace_ms = _ms(accept_grace)
        self._gate = asyncio.Semaphore(max_connections)
        cluster = _GatedCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            require_full_coverage=False,  # the other masters serve on while one shard fails over
            max_connections=2 * max_connections,  # per node; the gate keeps the calls in flight below it
            protocol=2,  # the replies parsed here (pub/sub arrays, script tables) are RESP2's
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),  # no resends: a write whose reply was lost could run twice
            **connection,
        )
        cluster.gate = self._gate
        self._redis: Any = cluster
        self.calls = NodeCalls(cluster, self._gate, timeout=socket_timeout)
        """Raw calls routed by slot; also what the RedisBroker code inherited here calls its pipe."""
        self._pipe: Any = self.calls
        # every script of the RedisBroker, registered again on the cluster client, PUBLISH made SPUBLISH
        for name, value in list(vars(self).items()):
            if isinstance(value, AsyncScript):
                setattr(self, name, cluster.register_script(sharded_script(value.script)))
        self._reserve_script = cluster.register_script(_RESERVE_LUA)
        self._takeover_script = cluster.register_script(_TAKEOVER_LUA)
        self._create_script = cluster.register_script(_CREATE_LUA)
        self._void_script = cluster.register_script(_VOID_LUA)
        self._release_script = cluster.register_script(_RELEASE_LUA)
        # replicas each master had when last asked (ROLE), and when: where WAIT can be met (see _replicas_ok)
        self._replicas: dict[str, tuple[int, float]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._fanout: ShardedFanout | None = None
        self._spread = itertools.count()
        self._tags: dict[str, list[str]] = {}
        self._turns: dict[str, int] = {}
        self._armed: dict[tuple[str, tuple[str, ...]], ArmedReads] = {}
        # the records of operations whose requests this process was handed (see get_operation)
        self._carried: dict[str, tuple[bytes, int, str | None, int]] = {}
        # the version and status this process last stored for an operation: a copy equal to it is its own
        self._written: dict[str, tuple[int, Status]] = {}

    # Lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the sharded fan-out; it connects as topics are followed, so the cluster may be down now."""
        if self._fanout is None:
            self._fanout = ShardedFanout(self)
            await asyncio.to_thread(slots.warm)

    async def close(self) -> None:
        """Give back what armed reads brought, stop the fan-out and close every connection."""
        for armed in self._armed.values():
            await armed.close()
        self._armed.clear()
        if self._fanout is not None:
            await self._fanout.close()
            self._fanout = None
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()
        await self.calls.close()
        await self._redis.aclose()

    async def ping(self) -> bool:
        """Whether every master answers PING within the ping timeout."""
        try:
            async with asyncio.timeout(self._ping_timeout):
                return bool(await self._redis.ping(target_nodes=RedisCluster.PRIMARIES))
        except Exception:  # any failure means "not ready"; /readyz must never raise
            return False

    @property
    def pubsub_connections(self) -> int:
        """Sharded pub/sub connections open now (one per master serving a followed topic)."""
        return self._fanout.connections if self._fanout is not None else 0

    # Commands --------------------------------------------------------------------------
    def operation_id(self, idempotency_key: str | None = None) -> str:
        """A new operation id; with an idempotency key, one whose slot is the key's record's.

        With ``wait_replicas``, an id without a key is drawn again (a few times) while its slot's master is known
        to lack the replicas, so a shard that lost them costs those commands nothing.
        """
        if idempotency_key is not None:
            return slots.operation_id_in_slot(slots.key_slot(_key("idem", idempotency_key)))
        op_id = new_operation_id()
        for _ in range(8 if self.wait_replicas else 0):
            if self._replicas_ok(slots.key_slot(_op_key(op_id))):
                break
            op_id = new_operation_id()
        return op_id

    # Replicas (HERALD_REDIS_WAIT_REPLICAS) ------------------------------------------------
    def _replicas_ok(self, slot: int) -> bool:
        """Whether the master of ``slot`` had ``wait_replicas`` replicas when last asked (unknown counts as yes:
        WAIT is what decides). Asks again, in the background, when that was over a second ago."""
        node = self._master(slot)
        if node is None:
            return True
        known = self._replicas.get(node.name)
        if known is None or time.monotonic() - known[1] > 1.0:
            task = asyncio.ensure_future(self._count_replicas(node))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        return known is None or known[0] >= self.wait_replicas

    async def _replicas_now(self, slot: int) -> bool:
        """:meth:`_replicas_ok`, asking the master first when what is known of it is over a second old (a refusal
        is never made on old news: a replica may be back)."""
        node = self._master(slot)
        if node is None:
            return True
        known = self._replicas.get(node.name)
        if known is not None and known[0] < self.wait_replicas and time.monotonic() - known[1] > 1.0:
            await self._count_replicas(node)
        return self._replicas_ok(slot)

    def _master(self, slot: int) -> ClusterNode | None:
        try:
            return self._redis.nodes_manager.get_node_from_slot(slot)
        except Exception:  # no slot map yet, or the slot is not served: let the write find out
            return None

    async def _count_replicas(self, node: ClusterNode) -> None:
        self._replicas[node.name] = (self._replicas.get(node.name, (self.wait_replicas, 0.0))[0], time.monotonic())
        try:
            async with asyncio.timeout(self._ping_timeout):
                [role] = await self.calls.on_node(node, [("ROLE",)])
        except Exception:  # unreachable: nothing can be confirmed there
            role = [b"master", 0, []]
        if isinstance(role, ResponseError):  # ROLE not allowed (a managed service, an ACL): WAIT alone decides
            count = self.wait_replicas
        else:
            count = len(role[2]) if isinstance(role, list) and role[0] == b"master" else 0
        self._replicas[node.name] = (count, time.monotonic())

    def shard_keys(self, event_type: str) -> list[str]:
        """The request streams of ``event_type``, one per shard."""
        return [_key("req", tag) for tag in self._shard_tags(event_type)]

    def _shard_tags(self, event_type: str) -> list[str]:
        tags = self._tags.get(event_type)
        if tags is None:
            tags = self._tags[event_type] = slots.shard_tags(event_type, self.shards)
        return tags

    async def accept(
        self,
        operation: Operation,
        request: Event,
        *,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> Accepted:
        """Reserve the idempotency key, queue the request, store the operation: see the module docstring."""
        op_key = _op_key(operation.id)
        idem = _key("idem", idempotency_key) if idempotency_key is not None else None
        if idem is not None and slots.key_slot(idem) != slots.key_slot(op_key):
            raise ValueError("an operation accepted with an idempotency key needs an id from operation_id(key)")
        stream = await self._request_stream(request.type, slots.key_slot(op_key))
        expires = int(time.time() * 1000) + _ms(self.operation_ttl)
        entry: list[Any] = ["XADD", stream, "*", "event", request.encoded, "op", orjson.dumps(operation.to_record()),
                            "exp", expires]
        if idem is not None:
            entry += ["idem", idem]
        with _reachable(self):
            if idem is not None:
                known = await self._reserve(idem, operation.id, fingerprint or "", expires)
                if known is not None:
                    return known
        try:
            with _reachable(self):
                # a WAIT needs a connection to itself: on the shared one it would hold up every call behind it
                queued = await self.calls.run(stream, [entry, *self._wait()], pooled=bool(self.wait_replicas),
                                              extra=self.wait_timeout)
        except BrokerUnavailable as exc:
            if not isinstance(exc.__cause__, NotSent):
                await self._void(operation, idem, expires)
            elif idem is not None:  # never sent: nothing was queued; free the key for the client's retry
                with contextlib.suppress(BrokerUnavailable), _reachable(self):
                    await self.calls.script(self._release_script, [idem], [operation.id])
            raise
        try:
            with _reachable(self):
                self._confirmed_by_replicas(stream, queued)
            outcome = await self._create([op_key, *([idem] if idem else [])],
                                         [operation.id, expires, *_fields(operation)])
        except BrokerUnavailable:
            await self._void(operation, idem, expires)
            raise
        if outcome not in (b"created", b"exists"):  # superseded: a retry took the key over meanwhile
            raise BrokerUnavailable(f"operation {operation.id} was not stored ({_text(outcome)}); try again")
        return Accepted(operation, created=True)

    async def _create(self, keys: list[str], args: list[Any]) -> Any:
        """Store the operation (step 3). The script only creates what is missing, so it is sent again, for up to
        the socket timeout, while the operation's master cannot be reached (a failover under way): the request
        is queued already, and a ``202`` then saves the client a retry that would run the command twice."""
        deadline = time.monotonic() + self._socket_timeout
        while True:
            try:
                with _reachable(self):
                    replies = await self.calls.execute_script(self._create_script, keys, args, then=self._wait(),
                                                              pooled=bool(self.wait_replicas), extra=self.wait_timeout)
                return self._confirmed_by_replicas(keys[0], replies)
            except ReplicasMissing:
                raise
            except BrokerUnavailable:
                if time.monotonic() > deadline:
                    raise
                await self.calls.refresh()
                await asyncio.sleep(0.2)

    async def _request_stream(self, event_type: str, op_slot: int) -> str:
        """The next shard of ``event_type`` in turn (with ``wait_replicas``: the next whose master has them)."""
        tags = self._shard_tags(event_type)
        turn = next(self._spread)
        if not self.wait_replicas:
            return _key("req", tags[turn % len(tags)])
        if not await self._replicas_now(op_slot):
            self.errors += 1
            raise BrokerUnavailable("the operation's shard has fewer replicas than HERALD_REDIS_WAIT_REPLICAS")
        for i in range(len(tags)):
            key = _key("req", tags[(turn + i) % len(tags)])
            if await self._replicas_now(slots.key_slot(key)):
                return key
        self.errors += 1
        raise BrokerUnavailable("no request shard has HERALD_REDIS_WAIT_REPLICAS replicas")

    async def _void(self, operation: Operation, idem: str | None, expires: int) -> None:
        """After a failed accept whose request may be queued: store the operation as failed unless a worker started
        it, and free its idempotency key, so the ``503`` stands for work not done (best effort: see the docstring)."""
        refused = transition(operation, Status.FAILED, error=problem(
            "https://herald.dev/problems/not-accepted", "Command not accepted", 503,
            "the broker could not store the command; it was answered 503 and will not run"))
        try:
            with _reachable(self):
                outcome = await self.calls.script(self._void_script,
                                                  [_op_key(operation.id), *([idem] if idem else [])],
                                                  [operation.id, expires, *_fields(refused)])
        except BrokerUnavailable as exc:
            log.warning("operation %s: the accept failed and could not be undone (%s); its request may still run "
                        "once its operation is created by a worker", operation.id, exc)
            return
        if outcome == b"started":
            log.warning("operation %s: the accept failed after a worker started it; it runs", operation.id)

    def _wait(self) -> list[tuple[Any, ...]]:
        return [("WAIT", self.wait_replicas, _ms(self.wait_timeout))] if self.wait_replicas else []

    def _confirmed_by_replicas(self, key: str, replies: Any) -> Any:
        """The first reply, once ``WAIT`` (the last, when asked) says enough replicas hold it."""
        replies = replies if isinstance(replies, list) else [replies]
        if isinstance(replies[0], Exception):
            raise replies[0]
        if self.wait_replicas:
            confirmed = replies[-1]
            if isinstance(confirmed, Exception):
                raise confirmed
            if int(confirmed) < self.wait_replicas:
                self.errors += 1
                try:  # remember it: the next commands go to other shards, and the slot map is read again
                    node = self._redis.nodes_manager.get_node_from_slot(slots.key_slot(key))
                    self._replicas[node.name] = (int(confirmed), time.monotonic())
                except Exception:
                    pass
                self.calls.refresh_soon()
                raise ReplicasMissing(f"{confirmed} of {self.wait_replicas} replicas confirmed the write in "
                                        f"{self.wait_timeout}s (a shard without its replicas)")
        return replies[0]

    async def _reserve(self, idem: str, op_id: str, fingerprint: str, expires: int) -> Accepted | None:
        """Reserve ``idem`` for ``op_id`` (``None``), or the operation it already stands for."""
        for _ in range(3):
            outcome, *rest = await self.calls.script(self._reserve_script, [idem], [op_id, fingerprint, expires])
            if outcome == b"reserved":
                return None
            if outcome == b"conflict":
                raise IdempotencyConflict(_text(rest[0]))
            other, age = _text(rest[0]), int(rest[1])
            existing = await RedisBroker.get_operation(self, other)
            if existing is not None:
                return Accepted(existing, created=False)
            if age < self._grace_ms:
                raise IdempotencyInProgress(f"operation {other} of this idempotency key is still being accepted")
            taken = await self.calls.script(self._takeover_script, [idem, _op_key(other)],
                                            [other, op_id, fingerprint, expires, self._grace_ms])
            if taken == b"reserved":
                log.warning("operation %s was reserved for its idempotency key but never stored; %s takes the key over",
                            other, op_id)
                return None
        raise BrokerUnavailable("the idempotency key kept changing; try again")

    async def consume(
        self, types: Sequence[str], consumer: str, *, count: int = 1, block: float = 1.0
    ) -> list[Delivery]:
        """Reclaimed deliveries first, then what this consumer's armed reads brought, then new ones read from the
        shards not armed, waiting up to ``block`` s on reads armed on every shard (module docstring)."""
        if not types or count < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block
        keys = {key: tag for t in types for key, tag in zip(self.shard_keys(t), self._shard_tags(t), strict=True)}
        turn = self._turns[consumer] = self._turns.get(consumer, -1) + 1
        order = list(keys)[turn % len(keys):] + list(keys)[:turn % len(keys)]  # fair: a rotating start
        state = (consumer, tuple(keys))
        armed = self._armed.get(state)
        if armed is None:
            armed = self._armed[state] = ArmedReads(self.calls, GROUP, consumer, hold=self._poll,
                                                    give_back=self._give_back, parse=_entries)
        regrouped = False
        while True:
            try:
                with _reachable(self):
                    await self._ensure_groups(keys)
                    out: list[Delivery] = []
                    if loop.time() >= self._reclaim_at.get(state, 0.0):
                        out = await self._reclaim_shards(order, keys, consumer, count)
                        self._reclaim_at[state] = 0.0 if len(out) >= count else loop.time() + self._poll
                    for key, entry in armed.take(count - len(out)):
                        delivery = await self._delivery(key, keys[key], entry)
                        out += [delivery] if delivery is not None else []
                    idle = [key for key in order if key not in armed.armed]
                    if len(out) < count and idle:
                        out += await self._sweep(idle, keys, consumer, count - len(out))
                    if len(out) >= count:
                        await armed.disarm()  # full: stop fetching work this consumer cannot start now
                    wait = min(max(0.0, deadline - loop.time()), self._poll)
                    if out or wait <= 0:
                        return out
                    for key in order:
                        armed.arm(key, count, wait, wait + self._socket_timeout)
                    await armed.wait(wait)
                    self._raise_read_errors(armed)
                    if not armed.buffered:
                        self._reclaim_at[state] = 0.0  # idle: look for abandoned work before waiting again
            except ResponseError as exc:
                # NOGROUP: the group vanished (a failover to a replica that never had it); make it once more
                if "NOGROUP" not in str(exc) or regrouped:
                    raise
                regrouped = True
                self._groups.clear()
                continue

    def _raise_read_errors(self, armed: ArmedReads) -> None:
        """What armed reads ended with: NOGROUP is raised (the groups are made again); a slot on the move or a
        master away is left to the next round, once the slot map is read again."""
        errors, armed.errors = armed.errors, []
        for error in errors:
            if isinstance(error, ResponseError) and "NOGROUP" in str(error):
                raise error
        if errors:
            self.calls.refresh_soon()

    async def _reclaim_shards(self, order: list[str], keys: dict[str, str], consumer: str,
                              count: int) -> list[Delivery]:
        args: list[Any] = [GROUP, consumer, _ms(self.visibility_timeout), count]
        replies = await asyncio.gather(*(self.calls.script(self._reclaim_script, [key], args) for key in order),
                                       return_exceptions=True)
        got: list[tuple[str, list[tuple[bytes, dict[bytes, bytes], int]]]] = []
        for key, reply in zip(order, replies, strict=True):
            if isinstance(reply, BaseException):
                if len([r for r in replies if isinstance(r, BaseException)]) == len(replies):
                    raise reply
                continue  # one master unreachable: its shards wait for the next reclaim
            got.append((key, [(e[0], dict(zip(e[1][::2], e[1][1::2], strict=True)), int(e[2])) for e in reply]))
        return await self._take(got, keys, count)

    async def _sweep(self, order: list[str], keys: dict[str, str], consumer: str, want: int) -> list[Delivery]:
        """New entries without blocking: ``want`` of them asked of the shards in ``order``, spread evenly; if some
        of the shards asked had none, the shards not asked yet are asked too."""
        first = order[:want]
        each, extra = divmod(want, len(first))
        asked = [(key, each + (i < extra)) for i, key in enumerate(first)]
        got = await self._read(asked, consumer)
        have = sum(len(entries) for _, entries in got)
        rest = order[want:]
        if have < want and rest:
            got += await self._read([(key, want - have) for key in rest], consumer)
        return await self._take(got, keys, want)

    async def _read(self, asked: list[tuple[str, int]], consumer: str) -> list[tuple[str, list[Any]]]:
        commands = [("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", n, "STREAMS", key, ">") for key, n in asked]
        replies = await self.calls.execute_many(commands)
        failed = [r for r in replies if isinstance(r, Exception)]
        for reply in failed:
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                raise reply
        if failed and len(failed) == len(replies):
            raise failed[0]
        return [(key, _entries(reply)) for (key, _), reply in zip(asked, replies, strict=True)
                if not isinstance(reply, Exception)]

    async def _take(self, got: Sequence[tuple[str, Sequence[Any]]], keys: dict[str, str],
                    count: int) -> list[Delivery]:
        """Deliveries of up to ``count`` entries, shard by shard in turn; the rest given back as never handed out.

        Entries are ``(id, fields)`` (new: delivered once) or ``(id, fields, deliveries)`` (reclaimed).
        """
        queues = [(key, list(entries)) for key, entries in got if entries]
        taken: list[tuple[str, Any]] = []
        while len(taken) < count and any(entries for _, entries in queues):
            for key, entries in queues:
                if entries and len(taken) < count:
                    taken.append((key, entries.pop(0)))
        for key, entries in queues:
            if entries:
                await self._give_back(key, entries)
        out: list[Delivery] = []
        for key, entry in taken:
            delivery = await self._delivery(key, keys[key], entry)
            if delivery is not None:
                out.append(delivery)
        return out

    async def _give_back(self, key: str, entries: Sequence[Any]) -> None:
        """Hand entries this consumer got but will not run to the next reclaim, their delivery counts as before."""
        by_count: dict[int, list[bytes]] = {}
        for entry in entries:
            by_count.setdefault(entry[2] if len(entry) > 2 else 1, []).append(entry[0])
        for deliveries, ids in by_count.items():
            await self.calls.execute("XCLAIM", key, GROUP, _RELEASED, 0, *ids, "IDLE", _LONG_IDLE_MS,
                                     "RETRYCOUNT", deliveries - 1, "JUSTID")
        self._reclaim_at.clear()  # only a reclaim hands them out: make it due everywhere

    async def _delivery(self, key: str, tag: str, entry: Any) -> Delivery | None:
        entry_id, fields = _text(entry[0]), entry[1]
        try:
            event = decode_event(fields[b"event"])
        except (KeyError, EventError):
            log.error("dropping an unreadable request entry %s from %s", entry_id, key)
            await self._done(key, entry_id)
            return None
        deliveries = entry[2] if len(entry) > 2 else 1
        carried: Operation | None = None
        if b"op" in fields and event.correlationid:
            idem = fields.get(b"idem")
            if len(self._carried) >= _CARRIED_MAX:
                self._carried.pop(next(iter(self._carried)))
            self._carried[event.correlationid] = (fields[b"op"], int(fields[b"exp"]), _text(idem) if idem else None,
                                                  int(entry_id.split("-", 1)[0]))
            if deliveries == 1:  # the operation as accepted: a first delivery is moved to running without a read
                carried = Operation.from_record(orjson.loads(fields[b"op"]))
        return Delivery(event=event, delivery_id=f"{tag}|{entry_id}", deliveries=deliveries, operation=carried)

    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge and delete the entry (and forget the record it carried)."""
        self._carried.pop(delivery.event.correlationid or "", None)
        await super().ack(delivery)

    async def release(self, delivery: Delivery) -> None:
        """Give the entry back for the next reclaim (and forget the record it carried)."""
        self._carried.pop(delivery.event.correlationid or "", None)
        await super().release(delivery)

    # Operations ------------------------------------------------------------------------
    async def get_operation(self, operation_id: str) -> Operation | None:
        """The stored operation.

        For one whose request this worker holds and that is missing: while the request is younger than an accept
        may take, its accept may still store it (or undo itself), so it is looked for again every 10 ms; after
        that, it is created from the record the request carries (the accept failed after queueing it), unless it
        expired or its idempotency key was taken over meanwhile.
        """
        found = await super().get_operation(operation_id)
        carried = self._carried.get(operation_id)
        if found is not None or carried is None:
            return found
        record, expires, idem, queued = carried
        while (now := time.time() * 1000) - queued < self._grace_ms and now < expires:
            await asyncio.sleep(0.01)
            found = await super().get_operation(operation_id)
            if found is not None:
                return found
        operation = Operation.from_record(orjson.loads(record))
        with _reachable(self):
            outcome = await self.calls.script(self._create_script, [_op_key(operation_id), *([idem] if idem else [])],
                                              [operation_id, expires, *_fields(operation)])
        if outcome == b"created":
            log.warning("operation %s was missing; created from its request", operation_id)
            return operation
        if outcome == b"exists":
            return await super().get_operation(operation_id)
        return None  # expired, or superseded: the worker acknowledges the request and runs nothing

    async def _update(
        self,
        operation_id: str,
        status: Status | None,
        change: Callable[[Operation], tuple[Operation, Event | None]],
        known: Operation | None = None,
        *,
        events: Sequence[tuple[str, Event]] = (),
        ack: Delivery | None = None,
    ) -> Operation:
        """The RedisBroker's update, in the operation's slot only (see the module docstring for the rest)."""
        topic = operation_topic(operation_id)
        own = [staged for t, staged in events if t == topic]
        others = [(t, event) for t, event in events if t != topic]
        keys = [_op_key(operation_id), *_topic_keys(topic), *(k for _ in own for k in _topic_keys(topic))]
        extra: list[Any] = [len(own), "", ""]
        for staged in own:
            extra += [_ms(self._ttl(topic)), staged.type, staged.encoded]
        if others and not self._own_live_copy(operation_id, known):
            known = None  # publish only once the stored operation said yes: a caller's copy may be stale or made up
        published = revived = False
        for _ in range(_CAS_ATTEMPTS):
            current, known = known or await self.get_operation(operation_id), None
            try:
                if current is None:
                    raise OperationNotFound(operation_id)
                updated, event = change(current)
            except (OperationNotFound, IllegalTransition):
                if ack is not None:
                    await self.ack(ack)
                raise
            if updated is current:
                return current
            if others and not published:
                await self.publish_many(others)
                published = True
            args: list[Any] = [current.version, status.value if status else "", self.history_size + 1,
                               _ms(self.operation_ttl), event.type if event else "",
                               event.encoded if event else b"", *extra, *_fields(updated)]
            with _reachable(self):
                outcome, *rest = await self.calls.script(self._update_script, keys, args)
            if outcome == b"ok":
                if len(self._written) >= _CARRIED_MAX:
                    self._written.pop(next(iter(self._written)))
                self._written[operation_id] = (updated.version, updated.status)
                if ack is not None:
                    await self._ack_after(ack)
                return updated
            if outcome == b"missing" and operation_id in self._carried and not revived:
                # moved from the copy its request carried, before the accept stored it (or after the accept failed):
                # get_operation waits for it, or creates it, as for any request whose operation is missing
                revived = True
                known = await self.get_operation(operation_id)
                if known is not None:
                    continue
            if outcome in (b"missing", b"illegal"):
                if ack is not None:
                    await self.ack(ack)
                if outcome == b"missing":
                    raise OperationNotFound(operation_id)
                raise IllegalTransition(Status(_text(rest[0])), status or Status.CANCELED)
            # "stale": another process changed it between our read and our write; read again
        raise BrokerUnavailable(f"operation {operation_id} kept changing; try again")

    def _own_live_copy(self, operation_id: str, known: Operation | None) -> bool:
        """Whether ``known`` is exactly what this process last stored for the operation (a worker's own copy),
        and the operation cannot have expired since (its expiry, from its request, is over a second away)."""
        carried = self._carried.get(operation_id)
        return (known is not None and carried is not None and time.time() * 1000 < carried[1] - 1000
                and self._written.get(operation_id) == (known.version, known.status))

    async def _ack_after(self, delivery: Delivery) -> None:
        """Acknowledge a request whose operation has just moved; a failure only means it is handed out again."""
        try:
            await self.ack(delivery)
        except BrokerUnavailable as exc:
            log.warning("could not acknowledge %s (%s); it is handed out again and finds its operation moved on",
                        delivery.delivery_id, exc)

    # Topics ----------------------------------------------------------------------------
    async def publish_many(self, items: Sequence[tuple[str, Event]]) -> list[str]:
        """Run the publish script for every ``(topic, event)``: one write per master, each append atomic."""
        if not items:
            return []
        commands = [self.publish_command(topic, event.type, event.encoded) for topic, event in items]
        with _reachable(self):
            replies = await self.calls.execute_many(commands)
            for i, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):  # a master without the script ran none of its share: in order
                    topic, event = items[i]
                    replies[i] = await self.calls.script(
                        self._publish_script, _topic_keys(topic),
                        [self.history_size + 1, _ms(self._ttl(topic)), event.type, event.encoded])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return [_text(c) for c in replies]

    async def _send_pubsub(self, command: str, topic: str) -> None:
        """The RedisBroker's subscribe and unsubscribe, done by the sharded fan-out (which may have to find the
        topic's master first: at most ``socket_timeout``)."""
        assert self._fanout is not None, "start() first"
        with _reachable(self):
            async with asyncio.timeout(self._socket_timeout):
                if command == "SUBSCRIBE":
                    await self._fanout.subscribe(topic)
                else:
                    await self._fanout.unsubscribe(topic)

    def _confirm(self, topic: str) -> None:
        """A subscription of ``topic`` is live: what the RedisBroker's reader does on ``subscribe``."""
        if topic in self._wanted:
            self._confirmed.add(topic)
            waiter = self._waiters.pop(topic, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a raw one-stream ``XREADGROUP`` reply (``None`` when there were none)."""
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for _stream, entries in reply or ():
        for entry_id, fields in entries:
            if fields:  # an entry deleted while it was pending comes back without fields
                out.append((entry_id, dict(zip(fields[::2], fields[1::2], strict=True))))
    return out

