"""When the subscribe tokens behind this process's streams run out: one timer wheel for all of them.

A stream opened with a subscribe token ends when that token expires (the client fetches a fresh
one and resumes with its cursor). A timer per connection would cost a handle and a callback per
stream; instead :class:`ExpiryWheel` keeps one bucket per wall-clock second (a token's ``exp`` is
whole seconds), and the hub's one sweeping task takes out each bucket once its second has come.

A subscriber holds at most one slot, its earliest expiry: a later token never postpones it, an
earlier one moves it. A stream opened without a token (a topic anyone may follow) has no expiry
and never enters the wheel. No I/O and no clock here: the sweeper passes the time in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from herald.hub import Subscriber


class ExpiryWheel:
    """Subscribers bucketed by the second their token expires; :meth:`expire` takes out the due ones."""

    __slots__ = ("_buckets", "_swept")

    def __init__(self) -> None:
        self._buckets: dict[int, set[Subscriber]] = {}
        self._swept = 0  # the last second :meth:`expire` took out; no bucket at or before it is left

    def __len__(self) -> int:
        """How many subscribers wait for their expiry."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def add(self, sub: Subscriber, expires_at: int) -> None:
        """Expire ``sub`` at ``expires_at`` (a token's ``exp``; 0 means never) unless it already expires earlier."""
        if expires_at <= 0:
            return
        # an expiry already swept past goes to the next sweep, which the range walk below reaches
        second = max(expires_at, self._swept + 1)
        current = sub.expires_at
        if current is not None:
            if current <= second:
                return
            self._take(sub, current)
        sub.expires_at = second
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
        bucket.add(sub)

    def discard(self, sub: Subscriber) -> None:
        """Forget ``sub`` (its connection is over)."""
        if sub.expires_at is not None:
            self._take(sub, sub.expires_at)
            sub.expires_at = None

    def expire(self, now: float) -> list[Subscriber]:
        """Take out every subscriber whose expiry is at or before ``now`` (Unix seconds), earliest first."""
        second = int(now)
        if second <= self._swept:
            return []
        if second - self._swept <= len(self._buckets):
            due = [s for s in range(self._swept + 1, second + 1) if s in self._buckets]
        else:  # a long pause (or the first sweep): walking the buckets is shorter than walking the seconds
            due = sorted(s for s in self._buckets if s <= second)
        self._swept = second
        out: list[Subscriber] = []
        for s in due:
            for sub in self._buckets.pop(s):
                sub.expires_at = None
                out.append(sub)
        return out

    def _take(self, sub: Subscriber, second: int) -> None:
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(sub)
            if not bucket:
                del self._buckets[second]
