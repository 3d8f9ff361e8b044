"""RedisBroker: the broker shared by any number of gateway and worker processes.

Keys (every name is ``herald:<kind>:{<name>}``; the braces make ``<name>`` the Redis
Cluster hash tag, so an operation's hash and its topic's stream share a slot)::

    herald:req:{<event type>}         stream   request events; group "herald-workers"; no TTL:
                                               an entry lives until it is acknowledged (XACK + XDEL);
                                               fields: event (the request's JSON) and the operation's
                                               hash fields as accepted (a worker starts from them)
    herald:op:{operations/<id>}       hash     Operation.to_record(); PEXPIRE operation_ttl, set once
                                               at accept (a transition does not extend it)
    herald:idem:{<idempotency key>}   hash     op (operation id), fp (request fingerprint);
                                               the same TTL as the operation it names
    herald:topic:{<topic>}            stream   fields type, event (CloudEvents JSON); capped at
                                               history_size + 1 entries (see below); PEXPIRE on
                                               every append: operation_ttl for operations/*,
                                               history_ttl for the rest
    herald:epoch:{<topic>}            string   the epoch of the topic's history (see below); the
                                               same TTL as its stream, renewed with it
    herald:res:{<path>}               string   a resource document (JSON), PX the caller's ttl
    herald:count:{<key>}              string   a rate-limit counter (INCR); EXPIRE its window

Fan-out: appending to a topic and ``PUBLISH``-ing it happen in one Lua script, so publish
order is stream order. The channel is named like the topic's stream key (SPUBLISH on a
Cluster hashes it to the same slot) and its payload is ``<cursor>\\n<type>\\n<event JSON>``,
so a frame is built without decoding the event. Each broker instance holds ONE pub/sub
connection and subscribes only the topics this process asked for.

Epochs: a topic's cursors are ``<stream id>.<epoch>`` (:mod:`herald.protocol`). The append
script makes a new epoch when the stream does not exist (first event, or the history was lost:
FLUSHALL, a failover to an empty replica, eviction, expiry) or its epoch key is gone (evicted
alone), in the same step as the XADD, so no extra round trip: the microsecond of Redis's ``TIME``,
modulo 36^6, in base 36 (at most 6 characters). A ``read`` after a cursor of another epoch, or
of one while the topic has no history, is a gap (``reset``) from the oldest event kept. The epoch
key shares the stream's hash tag, so both live in one slot on a Cluster.

Truncation is detected exactly with a sentinel: a topic's stream keeps ``history_size + 1``
entries (exact ``MAXLEN``, never ``~``) and the oldest one, once the stream is full, is not
shown. It is the newest event dropped from the history, so a ``read`` after cursor ``c`` is
truncated iff that sentinel is newer than ``c``. No extra key or write is needed, but every
process must use the same ``history_size``. (On Redis 7.0.15, ``XINFO STREAM``'s
``max-deleted-entry-id`` stays ``0-0`` after ``XADD MAXLEN``/``XTRIM``, only XDEL moves it,
so it cannot tell; checked by experiment.)

Request events: ``consume`` runs XAUTOCLAIM (idle > visibility_timeout, with the real
delivery counts from XPENDING, in one script) and then XREADGROUP ``>``, blocking in slices
of at most 1 s so reclaimed and released work is seen while it waits. The reclaim is a round
trip of its own, so a busy consumer runs it at most once per slice length (per consumer and
set of streams); it runs at once again when XREADGROUP found nothing new, when the reclaim
filled the whole ``count`` (more may be waiting), and after this instance gave an entry back.
A dead worker's job is so handed out within one slice (<= 1 s) of its visibility timeout,
by any consumer that is taking work.
``release`` re-claims the entry as idle for a year, so the next XAUTOCLAIM anywhere takes it.

Reconnection: the reader task retries with a backoff of 0.1 s to 2 s; on reconnect it
subscribes every wanted topic again, waits for the confirmations, then reads each topic's
history after the last cursor it delivered (or the topic's head when it was subscribed, ``0-0``
if it was empty then, when it delivered nothing yet) and hands those frames over before any
live one, dropping duplicates by cursor. A gap longer than the history is logged and reported
to the gap sink first (the hub tells the topic's clients: SSE ``herald.gap``, WebSocket
``gap``), then what is still kept follows. The reader's reads carry no timeout (a timer per
message cost a tenth of the gateway's CPU per delivery); a watchdog task PINGs the connection
after ``health_interval`` without a reply and closes it if the next interval is silent too,
which makes the reader reconnect. Every other call fails fast with
:class:`BrokerUnavailable`: no client retries, because replaying a write whose reply was
lost could queue a command twice.

A worker holds a lease on the jobs it runs: ``extend`` re-claims them every third of the
visibility timeout (XCLAIM ... JUSTID resets the idle time and leaves the delivery count), in
a script that first checks with XPENDING that the entry is still this consumer's, so a job
that outlasts the visibility timeout is not handed to a second worker while the first lives.

A worker ends an operation in one round trip: ``transition(..., events=..., ack=...)`` runs the
update script with the handler's staged events and the request's stream entry as well, so the
events are appended and PUBLISHed, the operation stored with its status event, and the entry
XACKed and XDELed in one atomic step (``'stale'`` does none of it; the CAS loop reads again).

``accept`` and the update script when given events or a delivery to acknowledge touch keys
of several slots: :mod:`herald.broker.cluster` (``redis+cluster://``) runs this design on a Redis
Cluster with one slot per script, sharded request streams and sharded pub/sub, re-registering
these scripts with ``SPUBLISH``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.broker.base import (
    Accepted,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Delivery,
    HistoryPage,
    IdempotencyConflict,
    OperationNotFound,
    StoredEvent,
)
from herald.broker.pipeline import AutoPipeline, pack
from herald.events import Event, EventError, decode_event
from herald.operations import ALLOWED, IllegalTransition, Operation, Status, operation_topic, status_event, transition
from herald.operations import request_cancel as cancel_flag
from herald.protocol import (
    Cursor,
    Frame,
    format_cursor,
    history_lost,
    is_terminal_type,
    join_cursor,
    parse_cursor,
    split_cursor,
)

log = logging.getLogger("herald.broker.redis")

GROUP = "herald-workers"
"""The consumer group through which every worker reads the request streams."""
_RELEASED = "herald-released"  # the consumer that holds released deliveries until they are reclaimed
_LONG_IDLE_MS = 365 * 86400 * 1000  # "idle for a year": past any visibility timeout, yet not in the future
_CAS_ATTEMPTS = 8
_UPDATE_ATTEMPTS = 32
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 2.0
# ClusterError and RedisClusterException: a Redis Cluster with a slot not served right now, or no node reachable
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, ReadOnlyError, ClusterDownError,
                TryAgainError, OSError, ClusterError, RedisClusterException)
_TEXT_FIELDS = frozenset({"id", "type", "status", "created_at", "updated_at"})  # stored as-is, the rest as JSON
_FIELD_NAMES = tuple(Operation(id="", type="").to_record())  # the hash's fields: Operation.to_record()'s keys

# append() returns the event's cursor "<stream id>.<epoch>" (herald.protocol's format) and PUBLISHes it.
# A new epoch: the microsecond Redis's TIME says, modulo 36^6, in base 36 (doubles hold it exactly).
_APPEND_LUA = """
local function new_epoch()
  local t = redis.call('TIME')
  local n = (tonumber(t[1]) * 1000000 + tonumber(t[2])) % 2176782336
  local digits, out = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  repeat
    local d = n % 36
    out = string.sub(digits, d + 1, d + 1) .. out
    n = (n - d) / 36
  until n == 0
  return out
end
local function append(stream, epoch_key, maxlen, ttl_ms, etype, event)
  -- NOMKSTREAM: a stream that is gone (its history lost) is not made again under its old epoch
  local epoch = redis.call('GETEX', epoch_key, 'PX', ttl_ms)
  local id = epoch and redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', maxlen, '*', 'type', etype, 'event', event)
  if not id then
    epoch = new_epoch()
    redis.call('SET', epoch_key, epoch, 'PX', ttl_ms)
    id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', 'type', etype, 'event', event)
  end
  local cursor = id .. '.' .. epoch
  redis.call('PEXPIRE', stream, ttl_ms)
  redis.call('PUBLISH', stream, cursor .. '\\n' .. etype .. '\\n' .. event)
  return cursor
end
"""

# KEYS: topic stream, its epoch key. ARGV: maxlen, ttl ms, event type, event JSON.
_PUBLISH_LUA = _APPEND_LUA + "return append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])"

# KEYS: op hash, request stream[, idempotency key]. ARGV: ttl ms, request JSON, fingerprint, op id, fields...
_ACCEPT_LUA = """
if KEYS[3] then
  local seen = redis.call('HMGET', KEYS[3], 'op', 'fp')
  if seen[1] then
    if seen[2] ~= ARGV[3] then return {'conflict', seen[1]} end
    return {'exists', seen[1]}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ARGV[4]} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[2], unpack(ARGV, 5))
if KEYS[3] then
  redis.call('HSET', KEYS[3], 'op', ARGV[4], 'fp', ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
return {'created'}
"""

# The state machine of herald.operations, carried into Lua so the store itself refuses a bad move.
_ALLOWED_LUA = "local allowed = {" + ", ".join(
    f"{src.value} = {{{', '.join(f'{dst.value} = true' for dst in sorted(dsts))}}}" for src, dsts in ALLOWED.items()
) + "}\n"

# KEYS: op hash, op topic stream, its epoch key, n x (event topic stream, its epoch key)[, request stream].
# ARGV: expected version, wanted status ('' = flag change only), maxlen, ttl ms, status event type
# ('' = no event), status event JSON, n, request entry id to ack ('' = none), group,
# n x (ttl ms, event type, event JSON), fields...
# An applied move publishes the n events, then stores the operation and appends its status event;
# a missing operation or an illegal move publishes nothing; all but 'stale' ack the request entry.
_UPDATE_LUA = _APPEND_LUA + _ALLOWED_LUA + """
local n = tonumber(ARGV[7])
local function settle()
  if ARGV[8] ~= '' then
    redis.call('XACK', KEYS[4 + 2 * n], ARGV[9], ARGV[8])
    redis.call('XDEL', KEYS[4 + 2 * n], ARGV[8])
  end
end
local cur = redis.call('HMGET', KEYS[1], 'version', 'status')
if not cur[1] then settle() return {'missing'} end
if cur[1] ~= ARGV[1] then return {'stale'} end
local moves = allowed[cur[2]]
if not moves or (ARGV[2] == '' and next(moves) == nil) or (ARGV[2] ~= '' and not moves[ARGV[2]]) then
  settle()
  return {'illegal', cur[2]}
end
settle()  -- first: an entry id Redis refuses fails the script before it has written anything
for i = 1, n do
  local a = 7 + 3 * i
  append(KEYS[2 + 2 * i], KEYS[3 + 2 * i], ARGV[3], ARGV[a], ARGV[a + 1], ARGV[a + 2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 10 + 3 * n))
if ARGV[5] ~= '' then append(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[6]) end
return {'ok'}
"""

# XAUTOCLAIM and the real delivery counts in one step. KEYS: request stream. ARGV: group, consumer,
# min idle ms, count. Entries deleted while pending come back empty (or in the third reply): skipped.
_RECLAIM_LUA = """
local out, start, want = {}, '0-0', tonumber(ARGV[4])
for _ = 1, 3 do
  local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], start, 'COUNT', want - #out)
  for _, entry in ipairs(res[2]) do
    if type(entry) == 'table' and entry[2] then
      local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
      out[#out + 1] = {entry[1], entry[2], p[1] and p[1][4] or 1}
    end
  end
  start = res[1]
  if start == '0-0' or #out >= want then break end
end
return out
"""


# KEYS: request stream. ARGV: group, consumer, entry ids. Re-claims (idle := 0) the ids this consumer
# still holds; returns the positions (1-based) of those it does not.
_EXTEND_LUA = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = i - 2
  end
end
return lost
"""


# KEYS: request stream. ARGV: group, entry id. Acknowledged and deleted in one step, so it is never handed out again.
_ACK_LUA = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

# KEYS: topic stream, its epoch key. The newest entry (an empty list if none) and the epoch, as of one moment.
_HEAD_LUA = """
return {redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1), redis.call('GET', KEYS[2])}
"""

# KEYS: counter. ARGV: amount, window seconds. The count, its expiry (re)set with it: it never outlives its window.
_HIT_LUA = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
"""


def _key(kind: str, name: str) -> str:
    return f"herald:{kind}:{{{name}}}"


def _topic_keys(topic: str) -> tuple[str, str]:
    """A topic's stream and its epoch key: what the append script touches for it."""
    return _key("topic", topic), _key("epoch", topic)


def _op_key(operation_id: str) -> str:
    return _key("op", operation_topic(operation_id))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _fields(op: Operation, before: Operation | None = None) -> list[str | bytes]:
    """The operation's hash fields, flat for HSET; with ``before``, only those that differ from it.

    A move changes three to five of the thirteen fields; the stored hash is ``before`` (the update
    script checked its version), so writing the rest again would only cost encoding and Redis time.
    """
    flat: list[str | bytes] = []
    for name in _FIELD_NAMES:
        value = getattr(op, name)
        if before is None or getattr(before, name) != value:
            flat += [name, value if name in _TEXT_FIELDS else orjson.dumps(value)]
    return flat


def _operation(raw: dict[Any, Any]) -> Operation | None:
    if not raw:
        return None
    record: dict[str, Any] = {}
    for raw_name, value in raw.items():
        name = raw_name.decode()
        record[name] = value.decode() if name in _TEXT_FIELDS else orjson.loads(value)
    return Operation.from_record(record)


def _stream_entries(raw: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """A raw ``XREADGROUP`` reply as redis-py's ``xreadgroup`` gives it: ``[(stream, [(id, {field: value})])]``."""
    return [(stream, [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in entries])
            for stream, entries in raw or ()]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _reachable:  # a lowercase name: used as ``with _reachable(broker):``, like a function
    """Turn "Redis cannot serve this now" into :class:`BrokerUnavailable`, counted in ``broker.errors``.

    A class rather than a ``@contextmanager``: every broker call enters one, and a generator-based
    context manager cost a few microseconds each time.
    """

    __slots__ = ("broker",)

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, _UNAVAILABLE):
            self.broker.errors += 1
            raise BrokerUnavailable(f"redis: {exc}") from exc


class RedisBroker(Broker):
    """A broker on one Redis: streams for requests and topics, hashes for operations, pub/sub fan-out."""

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 1000,
        operation_ttl: float = 86400,
        history_ttl: float = 86400,
        visibility_timeout: float = 30.0,
        # Timeouts
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        ping_timeout: float = 1.0,
        health_interval: float = 5.0,
        # Limits
        max_connections: int = 64,
    ) -> None:
        super().__init__()
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self.history_size = history_size
        self.operation_ttl = operation_ttl
        self.history_ttl = history_ttl
        self.visibility_timeout = visibility_timeout
        self._socket_timeout = socket_timeout
        self._ping_timeout = ping_timeout
        self._health_interval = health_interval
        # consume() blocks in slices this long, so reclaimed and released work is seen between them
        self._poll = min(1.0, max(0.05, visibility_timeout / 4))
        self._resource_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # A blocking pool: a burst of calls (thousands of clients subscribing at once) waits for one of
        # max_connections connections. redis-py's default pool refuses call 101 with "Too many connections",
        # which turned into 503s for SSE clients under load (found by the benchmark, scenario A).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,  # waiting longer than this for a connection means Redis is not keeping up
            protocol=2,  # the replies parsed here (pub/sub arrays, script tables) are RESP2's
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,  # above the longest BLOCK slice (<= 1 s)
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        # The calls of every request and job go through one connection, written together once per loop turn
        # (herald.broker.pipeline); the pool keeps what blocks (XREADGROUP BLOCK) or needs MULTI, and the rare rest.
        self._pipe = AutoPipeline(
            lambda: pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None}),
            timeout=socket_timeout,
        )
        self._accept_script = self._redis.register_script(_ACCEPT_LUA)
        self._update_script = self._redis.register_script(_UPDATE_LUA)
        self._publish_script = self._redis.register_script(_PUBLISH_LUA)
        self._reclaim_script = self._redis.register_script(_RECLAIM_LUA)
        self._extend_script = self._redis.register_script(_EXTEND_LUA)
        self._ack_script = self._redis.register_script(_ACK_LUA)
        self._hit_script = self._redis.register_script(_HIT_LUA)
        self._head_script = self._redis.register_script(_HEAD_LUA)
        self._groups: set[str] = set()
        # When consume() next runs the reclaim script, per (consumer, request streams): see consume().
        # No entry (or 0.0) means "at once"; clearing the dict makes every consumer's reclaim due.
        self._reclaim_at: dict[tuple[str, tuple[str, ...]], float] = {}
        # Fan-out state: topics wanted, confirmed on the current connection, and positions.
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._expiring: dict[float, list[asyncio.Future[None]]] = {}  # SUBSCRIBE waiters by deadline
        # positions (and their epochs): the last one handed over, and the head when subscribed, where a gap
        # fill starts if nothing came
        self._delivered: dict[str, tuple[Cursor, str | None]] = {}
        self._floor: dict[str, tuple[Cursor, str | None]] = {}
        self._pubsub: AbstractConnection | None = None
        self._pubsub_lock = asyncio.Lock()
        self._pubsub_out: list[tuple[str, str]] = []  # (command, channel) waiting for the next write
        self._pubsub_flush: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._received = 0  # replies read off pub/sub connections: the watchdog's sign of life

    # Lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pub/sub reader; it connects in the background, so Redis may be down now."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._listen_forever(), name="redis-broker-pubsub")

    async def close(self) -> None:
        """Stop the reader and close every connection."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()
        await self._pipe.close()
        await self._redis.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers PING within the ping timeout."""
        try:
            async with asyncio.timeout(self._ping_timeout):
                return bool(await self._redis.ping())
        except Exception:  # any failure means "not ready"; /readyz must never raise
            return False

    # Commands --------------------------------------------------------------------------
    async def accept(
        self,
        operation: Operation,
        request: Event,
        *,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> Accepted:
        """Check the idempotency key, store the operation and queue its request event in one script."""
        keys = [_op_key(operation.id), _key("req", request.type)]
        if idempotency_key is not None:
            keys.append(_key("idem", idempotency_key))
        args: list[Any] = [
            _ms(self.operation_ttl), request.encoded, fingerprint or "", operation.id, *_fields(operation)
        ]
        # An "exists" whose operation just expired is re-run: by then the key has expired with it.
        for _ in range(2):
            with _reachable(self):
                outcome, *rest = await self._pipe.script(self._accept_script, keys, args)
            if outcome == b"created":
                return Accepted(operation, created=True)
            if outcome == b"conflict":
                raise IdempotencyConflict(_text(rest[0]))
            existing = await self.get_operation(_text(rest[0]))
            if existing is not None:
                return Accepted(existing, created=False)
        raise OperationNotFound(operation.id)

    async def consume(
        self, types: Sequence[str], consumer: str, *, count: int = 1, block: float = 1.0
    ) -> list[Delivery]:
        """Reclaimed deliveries first, then new ones, waiting up to ``block`` seconds in short slices.

        The reclaim (XAUTOCLAIM) runs when due: at most once per slice length while XREADGROUP keeps
        finding new work, at once after it found none, after a reclaim that filled ``count`` and after
        this instance gave an entry back (see the module docstring).
        """
        if not types or count < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block
        keys = {_key("req", t): t for t in types}
        state = (consumer, tuple(keys))
        regrouped = False
        while True:
            try:
                with _reachable(self):
                    await self._ensure_groups(keys)
                    out: list[Delivery] = []
                    if loop.time() >= self._reclaim_at.get(state, 0.0):
                        out = await self._reclaim(keys, consumer, count)
                        # a full reclaim may have left more behind: look again next time
                        self._reclaim_at[state] = 0.0 if len(out) >= count else loop.time() + self._poll
                    if len(out) < count:
                        wait = min(max(0.0, deadline - loop.time()), self._poll)
                        new = await self._read_new(keys, consumer, count - len(out), wait)
                        if not new:
                            self._reclaim_at[state] = 0.0  # idle: look for abandoned work before waiting again
                        out += new
            except ResponseError as exc:
                # NOGROUP: the group vanished (a Redis without persistence restarted); make it once more
                if "NOGROUP" not in str(exc) or regrouped:
                    raise
                regrouped = True
                self._groups.clear()
                continue
            if out or loop.time() >= deadline:
                return out

    async def _ensure_groups(self, keys: dict[str, str]) -> None:
        for key in keys:
            if key in self._groups:
                continue
            try:
                # from 0: requests accepted before any worker existed are in the stream already
                await self._redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(key)

    async def _reclaim(self, keys: dict[str, str], consumer: str, count: int) -> list[Delivery]:
        out: list[Delivery] = []
        for key, type_ in keys.items():
            if len(out) >= count:
                break
            args: list[Any] = [GROUP, consumer, _ms(self.visibility_timeout), count - len(out)]
            for entry_id, fields, deliveries in await self._pipe.script(self._reclaim_script, [key], args):
                fields_map = dict(zip(fields[::2], fields[1::2], strict=True))
                out += await self._deliveries(key, type_, [(entry_id, fields_map)], int(deliveries))
        return out

    async def _read_new(self, keys: dict[str, str], consumer: str, count: int, wait: float) -> list[Delivery]:
        # First without BLOCK, on the shared connection (a busy worker finds work at once, with the other calls
        # of its loop turn); only when there is none, BLOCK on a connection of the pool (it would hold the
        # shared one up). BLOCK 0 would wait forever: with no time left, that first look is all.
        streams = [*keys, *(">" for _ in keys)]
        reply: Any = _stream_entries(await self._pipe.execute(
            "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "STREAMS", *streams))
        block = int(wait * 1000)
        if not reply and block:
            reply = await self._redis.xreadgroup(GROUP, consumer, dict.fromkeys(keys, ">"), count=count, block=block)
        out: list[Delivery] = []
        for key, entries in reply or []:
            key = _text(key)
            taken, extra = entries[: count - len(out)], entries[count - len(out):]
            out += await self._deliveries(key, keys[key], taken, 1)
            if extra:  # several streams answered: give back what exceeds count, as never handed out
                await self._redis.xclaim(key, GROUP, _RELEASED, 0, [e[0] for e in extra],
                                         idle=_LONG_IDLE_MS, retrycount=0, justid=True)
                self._reclaim_at.clear()  # only a reclaim hands them out: make it due everywhere
        return out

    async def _deliveries(
        self, key: str, type_: str, entries: list[tuple[bytes, dict[bytes, bytes]]], deliveries: int
    ) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields in entries:
            try:
                event = decode_event(fields[b"event"])
            except (KeyError, EventError):
                # not a request event Herald wrote; handing it out would only fail every worker in turn
                log.error("dropping an unreadable request entry %s from %s", _text(entry_id), key)
                await self._done(key, _text(entry_id))
                continue
            # the operation as accepted rides in the entry (see accept): a first delivery needs no read of it
            carried = _operation({k: v for k, v in fields.items() if k != b"event"}) if deliveries == 1 else None
            out.append(Delivery(event=event, delivery_id=f"{type_}|{_text(entry_id)}", deliveries=deliveries,
                                operation=carried))
        return out

    async def _done(self, key: str, entry_id: str) -> None:
        await self._pipe.script(self._ack_script, [key], [GROUP, entry_id])

    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge and delete the entry, so it is never handed out again."""
        type_, entry_id = delivery.delivery_id.rsplit("|", 1)
        with _reachable(self):
            await self._done(_key("req", type_), entry_id)

    async def release(self, delivery: Delivery) -> None:
        """Mark the entry idle for long, so the next consume's XAUTOCLAIM takes it at once."""
        type_, entry_id = delivery.delivery_id.rsplit("|", 1)
        with _reachable(self):
            # JUSTID: the count is not raised now; the reclaim that hands it out raises it
            await self._redis.xclaim(_key("req", type_), GROUP, _RELEASED, 0, [entry_id],
                                     idle=_LONG_IDLE_MS, justid=True)
        self._reclaim_at.clear()  # "at once": this instance's next consume reclaims before reading

    async def extend(self, deliveries: Sequence[Delivery], consumer: str) -> list[Delivery]:
        """Re-claim, per request stream, the entries ``consumer`` still holds, so their idle time starts again."""
        by_type: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_type.setdefault(delivery.delivery_id.rsplit("|", 1)[0], []).append(delivery)
        lost: list[Delivery] = []
        for type_, held in by_type.items():
            ids = [d.delivery_id.rsplit("|", 1)[1] for d in held]
            with _reachable(self):
                positions = await self._extend_script(keys=[_key("req", type_)], args=[GROUP, consumer, *ids])
            lost += [held[int(i) - 1] for i in positions]
        return lost

    # Operations ------------------------------------------------------------------------
    async def get_operation(self, operation_id: str) -> Operation | None:
        """The stored operation, or ``None`` if unknown or expired."""
        with _reachable(self):
            flat = await self._pipe.execute("HGETALL", _op_key(operation_id))
        return _operation(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def transition(
        self,
        operation_id: str,
        status: Status,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        location: str | None = None,
        traceparent: str | None = None,
        current: Operation | None = None,
        events: Sequence[tuple[str, Event]] = (),
        ack: Delivery | None = None,
    ) -> Operation:
        """Check the move in Python, then store it and append its status event if nobody changed it meanwhile.

        With ``current`` the first attempt skips the read: the script's version check refuses a stale copy.
        ``events`` and ``ack`` ride in the same script call (see :meth:`Broker.transition`); when the
        read or the Python check already refuses the move, ``ack`` costs a round trip of its own.
        """

        def change(current: Operation) -> tuple[Operation, Event | None]:
            updated = transition(current, status, result=result, error=error, location=location)
            return updated, status_event(updated, source=self.source, traceparent=traceparent)

        return await self._update(operation_id, status, change, current, events=events, ack=ack)

    async def request_cancel(self, operation_id: str) -> Operation:
        """Set the cancel flag (no event: the worker that honours it publishes ``canceled``)."""
        return await self._update(operation_id, None, lambda current: (cancel_flag(current), None))

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
        keys = [_op_key(operation_id), *_topic_keys(operation_topic(operation_id)),
                *(key for topic, _ in events for key in _topic_keys(topic))]
        extra: list[Any] = [len(events), "", ""]
        if ack is not None:
            type_, entry_id = ack.delivery_id.rsplit("|", 1)
            keys.append(_key("req", type_))
            extra[1:] = [entry_id, GROUP]
        for topic, staged in events:
            extra += [_ms(self._ttl(topic)), staged.type, staged.encoded]
        for _ in range(_CAS_ATTEMPTS):
            current, known = known or await self.get_operation(operation_id), None
            try:
                if current is None:
                    raise OperationNotFound(operation_id)
                updated, event = change(current)  # raises IllegalTransition from the Python check
            except (OperationNotFound, IllegalTransition):
                if ack is not None:  # refused before the script: acknowledge on its own
                    await self.ack(ack)
                raise
            if updated is current:
                return current
            args: list[Any] = [current.version, status.value if status else "", self.history_size + 1,
                               _ms(self.operation_ttl), event.type if event else "",
                               event.encoded if event else b"", *extra, *_fields(updated, current)]
            with _reachable(self):
                outcome, *rest = await self._pipe.script(self._update_script, keys, args)
            if outcome == b"ok":
                return updated
            if outcome == b"missing":  # the script acknowledged ``ack``
                raise OperationNotFound(operation_id)
            if outcome == b"illegal":  # the script acknowledged ``ack``
                raise IllegalTransition(Status(_text(rest[0])), status or Status.CANCELED)
            # "stale": another process changed it between our read and our write; read again
        raise BrokerUnavailable(f"operation {operation_id} kept changing; try again")

    # Topics ----------------------------------------------------------------------------
    async def publish(self, topic: str, event: Event) -> str:
        """Append to the topic's capped stream and PUBLISH it, atomically; return its cursor."""
        with _reachable(self):
            cursor = await self._pipe.script(
                self._publish_script, _topic_keys(topic),
                [self.history_size + 1, _ms(self._ttl(topic)), event.type, event.encoded],
            )
        return _text(cursor)

    def _ttl(self, topic: str) -> float:
        return self.operation_ttl if topic.startswith("operations/") else self.history_ttl

    async def publish_many(self, items: Sequence[tuple[str, Event]]) -> list[str]:
        """Run the publish script for every ``(topic, event)``, pipelined: one round trip for all of them.

        Each append-and-PUBLISH stays atomic on its own; the batch is not a transaction.
        """
        if not items:
            return []
        commands = [self.publish_command(topic, event.type, event.encoded) for topic, event in items]
        with _reachable(self):
            replies = await self._pipe.execute_many(commands)
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if lost:  # a Redis that lost its scripts (restarted) ran none of those: load it, once, and run them
                await self._pipe.execute("SCRIPT", "LOAD", _PUBLISH_LUA)
                for i, reply in zip(lost, await self._pipe.execute_many([commands[i] for i in lost]), strict=True):
                    replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [_text(c) for c in replies]

    def publish_command(self, topic: str, event_type: str, encoded: bytes) -> tuple[str | bytes | int, ...]:
        """The one Redis command that appends an encoded event to ``topic`` and PUBLISHes it.

        ``EVALSHA`` of the publish script, which Redis must have: :meth:`publish` and :meth:`publish_many`
        load it when it is missing. The benchmark's publisher sends exactly this over its own
        connection, so what it writes is what Herald's workers write.
        """
        return ("EVALSHA", self._publish_script.sha, 2, *_topic_keys(topic), self.history_size + 1,
                _ms(self._ttl(topic)), event_type, encoded)

    async def read(self, topic: str, after: str | None, *, limit: int = 1000) -> HistoryPage:
        """Kept events after a cursor; ``truncated`` when the sentinel (newest dropped) is newer.

        A cursor of another epoch (``reset``) costs a second round trip, to read from the oldest kept.
        """
        key, epoch_key = _topic_keys(topic)
        after_key, after_epoch = split_cursor(after) if after is not None else (None, None)
        start = "(" + format_cursor(after_key) if after_key is not None else "-"
        with _reachable(self):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xlen(key)
                pipe.xrange(key, "-", "+", count=2)
                pipe.xrange(key, start, "+", count=limit + 1)
                pipe.get(epoch_key)
                length, oldest_two, entries, raw_epoch = await pipe.execute()
        epoch = _text(raw_epoch) if raw_epoch is not None and length else None
        reset = history_lost(after_epoch, epoch)
        if reset:
            after_key = None
            if length and start != "-":
                with _reachable(self):
                    entries = await self._redis.xrange(key, "-", "+", count=limit + 1)
        sentinel = oldest_two[0][0] if length > self.history_size else None
        kept = oldest_two[1:] if sentinel is not None else oldest_two
        events = [self._stored(topic, e, epoch) for e in entries if e[0] != sentinel][:limit]
        truncated = reset or (
            sentinel is not None and (after_key is None or after_key < parse_cursor(_text(sentinel))))
        oldest = join_cursor(_text(kept[0][0]), epoch) if kept else None
        return HistoryPage(events=events, truncated=truncated, oldest=oldest, reset=reset)

    @staticmethod
    def _stored(topic: str, entry: Any, epoch: str | None) -> StoredEvent:
        return StoredEvent(topic, join_cursor(_text(entry[0]), epoch), decode_event(entry[1][b"event"]))

    async def tail(self, topic: str, count: int) -> list[StoredEvent]:
        """The newest ``count`` events, oldest first (never the sentinel: it is older than history_size)."""
        if count <= 0:
            return []
        key, epoch_key = _topic_keys(topic)
        with _reachable(self):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrevrange(key, "+", "-", count=min(count, self.history_size))
                pipe.get(epoch_key)
                entries, raw_epoch = await pipe.execute()
        epoch = _text(raw_epoch) if raw_epoch is not None else None
        return [self._stored(topic, e, epoch) for e in reversed(entries)]

    async def head(self, topic: str) -> str | None:
        """The newest cursor of a topic, or ``None``.

        For a topic this process follows, the answer is the newest cursor it has handed over (or
        the head it read when it subscribed), without a round trip: anything published since is
        on its way over pub/sub and comes after it. Every client that starts live asks this once,
        so a burst of clients on followed topics costs Redis nothing here.
        """
        if topic in self._confirmed and (topic in self._floor or topic in self._delivered):
            delivered, floor = self._delivered.get(topic), self._floor.get(topic)
            # the floor is newer only within the same history (a frame published before the head was read)
            known = max(delivered, floor) if delivered and floor and delivered[1] == floor[1] else delivered or floor
            assert known is not None
            return format_cursor(*known) if known[0] != (0, 0) else None
        return await self._read_head(topic)

    async def _read_head(self, topic: str) -> str | None:
        # a script, not a MULTI: it rides the shared connection with the other calls of this loop turn (every
        # SSE client that is first on its topic reads the head once)
        with _reachable(self):
            newest, raw_epoch = await self._pipe.script(self._head_script, _topic_keys(topic), ())
        return join_cursor(_text(newest[0][0]), _text(raw_epoch) if raw_epoch else None) if newest else None

    async def subscribe(self, topic: str) -> None:
        """SUBSCRIBE on the shared connection and wait until Redis confirms it."""
        await self.start()
        if topic in self._confirmed:
            return
        self._wanted.add(topic)
        waiter = self._waiters.get(topic)
        if waiter is None:
            waiter = self._waiters[topic] = asyncio.get_running_loop().create_future()
            self._expire_unconfirmed(waiter)
        try:
            await self._send_pubsub("SUBSCRIBE", topic)
            await asyncio.shield(waiter)
            head = await self._read_head(topic)
        except (TimeoutError, BrokerUnavailable) as exc:
            await self.unsubscribe(topic)
            raise BrokerUnavailable(f"could not subscribe to {topic}") from exc
        if topic not in self._delivered:
            # an empty topic's floor is 0-0: what it gets while the connection is down is all new
            self._floor[topic] = split_cursor(head) if head is not None else ((0, 0), None)

    def _expire_unconfirmed(self, waiter: asyncio.Future[None]) -> None:
        """Fail ``waiter`` with ``TimeoutError`` if Redis has not confirmed its SUBSCRIBE in ``socket_timeout``.

        One timer for every subscription asked within the same tenth of a second, not an
        ``asyncio.timeout`` each: a thousand clients connecting at once, each first on its topic,
        arm one or two timers instead of a thousand (a timer armed and cancelled per connection
        was a tenth of the gateway's CPU per SSE connect).
        """
        loop = asyncio.get_running_loop()
        deadline = math.ceil((loop.time() + self._socket_timeout) * 10) / 10
        batch = self._expiring.get(deadline)
        if batch is None:
            batch = self._expiring[deadline] = []
            loop.call_at(deadline, self._expire, deadline)
        batch.append(waiter)

    def _expire(self, deadline: float) -> None:
        for waiter in self._expiring.pop(deadline, ()):
            if not waiter.done():
                waiter.set_exception(TimeoutError("no SUBSCRIBE confirmation"))
                waiter.exception()  # retrieved: a subscriber that gave up meanwhile is not logged as lost

    async def unsubscribe(self, topic: str) -> None:
        """Forget the topic at once; UNSUBSCRIBE if connected (a reconnect leaves it out anyway)."""
        self._wanted.discard(topic)
        self._confirmed.discard(topic)
        self._delivered.pop(topic, None)
        self._floor.pop(topic, None)
        waiter = self._waiters.pop(topic, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        try:
            await self._send_pubsub("UNSUBSCRIBE", topic)
        except (TimeoutError, BrokerUnavailable):
            pass  # a connection that cannot take it now subscribes only what is wanted when it comes back

    async def _send_pubsub(self, command: str, topic: str) -> None:
        """Queue ``command`` for ``topic`` with the others of this loop turn: one write, one command per run.

        A thousand clients connecting at once, each first on its topic, send one SUBSCRIBE of a thousand
        channels rather than a thousand SUBSCRIBEs (each one a lock, a packing and a write). Returns at
        once: the write happens at the end of the turn (or, when not connected, the reader subscribes
        every wanted topic when it connects), and a SUBSCRIBE's confirmation comes through its waiter.
        """
        self._pubsub_out.append((command, _key("topic", topic)))
        if self._pubsub_flush is None:
            self._pubsub_flush = asyncio.get_running_loop().create_task(self._flush_pubsub())

    async def _flush_pubsub(self) -> None:
        try:
            async with self._pubsub_lock:
                while self._pubsub_out:
                    batch, self._pubsub_out = self._pubsub_out, []
                    conn = self._pubsub
                    if conn is None or not conn.is_connected:
                        continue  # the reader (re)subscribes every wanted topic when it connects
                    runs: list[list[str]] = []  # consecutive channels of one command, in the order asked
                    for command, channel in batch:
                        if runs and runs[-1][0] == command:
                            runs[-1].append(channel)
                        else:
                            runs.append([command, channel])
                    try:
                        await conn.send_packed_command([pack(run) for run in runs], check_health=False)
                    except (RedisError, OSError):
                        pass  # the reader sees the broken connection too, and reconnects
        finally:
            self._pubsub_flush = None

    # The pub/sub reader ----------------------------------------------------------------
    async def _listen_forever(self) -> None:
        delay = _BACKOFF_MIN
        opened = False
        while True:
            conn: AbstractConnection | None = None
            try:
                conn = self._redis.connection_pool.make_connection()
                await self._open(conn)
                self.reconnects += opened  # the first connection is not a reconnection
                opened = True
                delay = _BACKOFF_MIN
                await self._pump(conn)
            except Exception as exc:  # whatever broke the connection, the cure is a new one
                # warn once per outage, not on every retry while Redis stays away
                log.log(logging.WARNING if delay == _BACKOFF_MIN else logging.DEBUG,
                        "pub/sub connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self._pubsub = None
                self._confirmed.clear()
                if conn is not None:
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _open(self, conn: AbstractConnection) -> None:
        await conn.connect()
        early: list[Any] = []
        async with self._pubsub_lock:
            topics = sorted(self._wanted)
            if topics:
                await conn.send_command("SUBSCRIBE", *(_key("topic", t) for t in topics))
            pending = {_key("topic", t).encode() for t in topics}
            while pending:  # history is read only once the subscriptions are live: nothing falls between
                reply = await conn.read_response(timeout=self._socket_timeout)
                if reply is None:
                    raise RedisTimeoutError("no SUBSCRIBE confirmation")
                if reply[0] == b"subscribe":
                    pending.discard(reply[1])
                    self._on_reply(reply)
                else:
                    early.append(reply)
            self._pubsub = conn
        for topic in topics:
            await self._refill(topic)
        for reply in early:
            self._on_reply(reply)

    async def _refill(self, topic: str) -> None:
        """Hand over what ``topic`` got while it was not subscribed: its history after the last position handed over
        (or its floor), the gap reported first when more went by than the history keeps (the cluster broker calls
        this too, after a topic moved to another master)."""
        start = self._delivered.get(topic) or self._floor.get(topic)
        if start is None or topic not in self._wanted:
            return
        page = await self.read(topic, format_cursor(*start), limit=self.history_size + 1)
        if page.reset:
            log.warning("the history of %s was lost during the outage (it has a new epoch)", topic)
            self._gap(topic, page.oldest, epoch=start[1], reset=True)
            self._delivered.pop(topic, None)
            self._floor[topic] = ((0, 0), None)  # what comes next is all new: before its first event
        elif page.truncated:
            log.warning("events of %s were dropped from the history during the outage", topic)
            self._gap(topic, page.oldest, epoch=start[1])
        for stored in page.events:
            self._hand(Frame.from_event(topic, stored.cursor, stored.event))

    async def _pump(self, conn: AbstractConnection) -> None:
        # Reads block without a timeout: a per-read timeout (a timer armed and cancelled for every
        # message) was a tenth of the gateway's CPU per delivery. The watchdog tells a quiet connection
        # from a dead one instead.
        stalled = asyncio.Event()
        watchdog = asyncio.create_task(self._watch(conn, stalled), name="redis-broker-pubsub-watchdog")
        read, on_reply = conn.read_response, self._on_reply
        try:
            while True:
                reply = await read(timeout=math.inf)
                self._received += 1
                on_reply(reply)
        except (RedisError, OSError) as exc:
            if stalled.is_set():
                raise RedisConnectionError("the pub/sub connection stopped answering") from exc
            raise
        finally:
            watchdog.cancel()

    async def _watch(self, conn: AbstractConnection, stalled: asyncio.Event) -> None:
        """PING the connection after ``health_interval`` without a reply; close it if the next one is silent too."""
        seen, pinged = self._received, False
        while True:
            await asyncio.sleep(self._health_interval)
            if self._received != seen:
                seen, pinged = self._received, False
                continue
            if pinged:
                stalled.set()
                await conn.disconnect(nowait=True)  # the pump's pending read fails, and the reader reconnects
                return
            try:
                async with self._pubsub_lock:
                    await conn.send_command("PING")
            except (RedisError, OSError):
                return  # the connection is broken: the pump's read fails too, and the reader reconnects
            pinged = True

    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG outside subscribed mode
        kind, channel, data = reply[0], _text(reply[1]), reply[2]
        topic = channel[len("herald:topic:{"):-1]
        if kind == b"message":
            cursor, raw_type, encoded = data.split(b"\n", 2)
            type_ = raw_type.decode()
            self._hand(Frame(topic, cursor.decode(), type_, encoded, terminal=is_terminal_type(type_)))
        elif kind == b"subscribe" and topic in self._wanted:
            self._confirmed.add(topic)
            waiter = self._waiters.pop(topic, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _hand(self, frame: Frame) -> None:
        if frame.topic not in self._wanted:
            return
        last = self._delivered.get(frame.topic)
        if last is not None and frame.key <= last[0] and frame.epoch == last[1]:
            return  # already handed over (gap fill and live overlap after a reconnect)
        self._delivered[frame.topic] = (frame.key, frame.epoch)
        try:
            self._deliver(frame)
        except Exception:  # a failing sink must not stop the fan-out of every other topic
            log.exception("the frame sink failed on %s", frame.topic)

    # Counters --------------------------------------------------------------------------
    async def hit(self, key: str, window: int, amount: int = 1) -> int:
        """INCRBY the counter and (re)set its expiry in one script, so it never outlives its window."""
        with _reachable(self):
            count = await self._pipe.script(self._hit_script, [_key("count", key)], [amount, window])
        return int(count)

    # Resources -------------------------------------------------------------------------
    async def put_resource(self, path: str, document: dict[str, Any], *, ttl: int) -> None:
        """Store a JSON document for ``ttl`` seconds."""
        with _reachable(self):
            await self._pipe.execute("SET", _key("res", path), orjson.dumps(document), "PX", _ms(ttl))

    async def get_resource(self, path: str) -> dict[str, Any] | None:
        """The document, or ``None`` if missing or expired."""
        with _reachable(self):
            raw = await self._pipe.execute("GET", _key("res", path))
        return None if raw is None else orjson.loads(raw)

    async def update_resource(
        self, path: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], *, ttl: int
    ) -> dict[str, Any] | None:
        """Optimistic: ``WATCH``, ``GET``, then ``SET`` in a ``MULTI`` that fails if another writer got in first.

        ``change`` runs in this process (a Lua script would have to re-encode the JSON). Writers of
        one path in this process take turns (a lock per path), so only other processes conflict;
        after a conflict the update is tried again after a short random pause, up to
        :data:`_UPDATE_ATTEMPTS` times.
        """
        key = _key("res", path)
        lock = self._resource_locks.get(path)
        if lock is None:
            lock = self._resource_locks[path] = asyncio.Lock()  # weakly held: gone with its last writer
        async with lock:
            for attempt in range(_UPDATE_ATTEMPTS):
                with _reachable(self):
                    async with self._redis.pipeline(transaction=True) as pipe:
                        try:
                            await pipe.watch(key)
                            raw = await pipe.get(key)
                            if raw is None:
                                return None
                            document: dict[str, Any] = orjson.loads(raw)
                            changed = change(document)
                            if changed is None:
                                return document
                            pipe.multi()
                            pipe.set(key, orjson.dumps(changed), px=_ms(ttl))
                            await pipe.execute()
                            return changed
                        except WatchError:
                            pass
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise BrokerError(f"{path}: {_UPDATE_ATTEMPTS} concurrent updates in a row; try again")

    async def put_resource_if_absent(self, path: str, document: dict[str, Any], *, ttl: int) -> dict[str, Any]:
        """``SET key document NX GET PX ttl`` (Redis >= 7.0): one round trip, atomic.

        Returns the document already stored (its TTL left alone), or ``document`` if this call stored it.
        """
        with _reachable(self):
            raw = await self._pipe.execute("SET", _key("res", path), orjson.dumps(document), "NX", "GET", "PX",
                                           _ms(ttl))
        return document if raw is None else orjson.loads(raw)  # raw: the stored value (bytes)
