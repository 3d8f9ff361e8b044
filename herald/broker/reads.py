"""ArmedReads: one consumer's blocking reads of the request shards, kept waiting between ``consume`` calls.

On a Redis Cluster a consumer cannot wait on all the request streams with one ``XREADGROUP``: the
streams are in different slots. It waits on each with a blocking read of its own. Ending those
reads each time one of them brings work (and starting them again at the next ``consume``) cost
about a dozen commands per job; so they stay armed: a read that brings entries puts them in this
consumer's buffer and is armed again at the next ``consume``, which takes from the buffer first.

A buffered entry is this consumer's (it is pending in its name) but nobody runs it yet. Two rules
keep it from waiting long or being run twice:

* a ``consume`` that fills its whole ``count`` disarms the other reads (``CLIENT UNBLOCK``): a
  worker that is full stops fetching work it cannot start;
* an entry left in the buffer for ``hold`` seconds (a fraction of the visibility timeout) is given
  back (the broker's ``give_back``: idle for a year, its delivery count as before), so the next
  reclaim anywhere hands it out, well before the visibility timeout could hand it out twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode

from herald.broker.nodes import NodeCalls

log = logging.getLogger("herald.broker.cluster")

Entry = tuple[bytes, dict[bytes, bytes]]
GiveBack = Callable[[str, Sequence[Entry]], Awaitable[None]]


class ArmedReads:
    """The blocking reads of one consumer (of one set of streams), and the entries they brought."""

    def __init__(self, calls: NodeCalls, group: str, consumer: str, *, hold: float, give_back: GiveBack,
                 parse: Callable[[Any], list[Entry]]) -> None:
        self._calls = calls
        self._group = group
        self._consumer = consumer
        self._hold = hold
        self._give_back = give_back
        self._parse = parse
        self._reads: dict[str, tuple[asyncio.Task[Any], asyncio.Future[tuple[ClusterNode, int]]]] = {}
        self._buffer: collections.deque[tuple[str, Entry, float]] = collections.deque()
        self._landed = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        """What reads ended with instead of entries since the caller last looked (and cleared it)."""

    @property
    def armed(self) -> set[str]:
        """The streams with a read waiting now."""
        return set(self._reads)

    def arm(self, key: str, count: int, block: float, timeout: float) -> None:
        """Start a blocking read of up to ``count`` new entries of ``key``, waiting up to ``block`` s."""
        if key in self._reads:
            return
        client_id: asyncio.Future[tuple[ClusterNode, int]] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._calls.blocking(
            key, ("XREADGROUP", "GROUP", self._group, self._consumer, "COUNT", count,
                  "BLOCK", max(1, int(block * 1000)), "STREAMS", key, ">"), client_id, timeout=timeout))
        self._reads[key] = (task, client_id)
        task.add_done_callback(lambda t: self._land(key, t))

    def _land(self, key: str, task: asyncio.Task[Any]) -> None:
        current = self._reads.get(key)
        if current is not None and current[0] is task:
            del self._reads[key]
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.errors.append(error)
        else:
            now = asyncio.get_running_loop().time()
            self._buffer.extend((key, entry, now) for entry in self._parse(task.result()))
            if self._buffer and self._expiry is None:
                self._expiry = asyncio.get_running_loop().call_later(self._hold, self._expire)
        self._landed.set()

    def take(self, count: int) -> list[tuple[str, Entry]]:
        """Up to ``count`` buffered entries, oldest first."""
        out: list[tuple[str, Entry]] = []
        while self._buffer and len(out) < count:
            key, entry, _ = self._buffer.popleft()
            out.append((key, entry))
        return out

    @property
    def buffered(self) -> bool:
        """Whether entries are waiting to be taken."""
        return bool(self._buffer)

    async def wait(self, timeout: float) -> None:
        """Until a read lands (with entries, nothing, or an error), or ``timeout`` s."""
        self._landed.clear()
        if not self._reads:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._landed.wait()

    async def disarm(self) -> None:
        """End every waiting read at once (``CLIENT UNBLOCK``); what they brought meanwhile is buffered."""
        reads = list(self._reads.values())
        await asyncio.gather(*(self._calls.unblock(client_id) for _, client_id in reads), return_exceptions=True)
        await asyncio.gather(*(task for task, _ in reads), return_exceptions=True)

    def _expire(self) -> None:
        self._expiry = None
        task = asyncio.ensure_future(self._return_old())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _return_old(self) -> None:
        cutoff = asyncio.get_running_loop().time() - self._hold
        old: dict[str, list[Entry]] = {}
        while self._buffer and self._buffer[0][2] <= cutoff:
            key, entry, _ = self._buffer.popleft()
            old.setdefault(key, []).append(entry)
        if self._buffer and self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self._hold, self._expire)
        await self._return(old)

    async def _return(self, entries: dict[str, list[Entry]]) -> None:
        for key, held in entries.items():
            try:
                await self._give_back(key, held)
            except Exception as exc:  # the broker is away: they are handed out again after the visibility timeout
                log.warning("could not give back %d entries of %s (%s)", len(held), key, exc)

    async def close(self) -> None:
        """End the reads and give back everything buffered."""
        await self.disarm()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        rest: dict[str, list[Entry]] = {}
        for key, entry, _ in self._buffer:
            rest.setdefault(key, []).append(entry)
        self._buffer.clear()
        await self._return(rest)
        for task in list(self._tasks):
            task.cancel()
