"""Admission: the push connections and long polls this process holds, in all and by whom.

Every SSE stream and WebSocket is counted from its handshake (a WebSocket before it follows any
topic) to its end, against three caps:

* ``HERALD_MAX_CONNECTIONS``, the whole process: ``503`` (another gateway may have room);
* ``HERALD_MAX_CONNECTIONS_PER_CLIENT``, one client (its bearer subject, else its address):
  ``429``, so that one client cannot take the whole pool;
* ``HERALD_MAX_CONNECTIONS_PER_TOKEN``, one subscribe token (a digest of it): ``429``, so that
  one token handed out (a room's, in a page anyone may load) cannot either.

Long polls (``Prefer: wait``, ``?wait=``) hold a request open as well, and have a cap of their
own, ``HERALD_MAX_LONG_POLLS``: beyond it a request is answered at once, as if it had not asked
to wait (a command is never refused for that).

Kept cheap, as it is paid per connection: two counters in plain dicts, and a :class:`Seat`
holding their keys so the connection can give them back; a key leaves its dict when its count
falls to zero, so the dicts hold only the clients and tokens connected now. No task, no timer.
"""

from __future__ import annotations

import hashlib
import sys

from herald.settings import Settings


class Seat:
    """One admitted connection's keys in the counters, given back with :meth:`Admission.release`."""

    __slots__ = ("client", "token")

    def __init__(self, client: str, token: str | None) -> None:
        self.client = client
        self.token = token


def token_key(token: str | None) -> str | None:
    """What a subscribe token is counted by: a short digest (a token may be kilobytes, and is a secret)."""
    if not token:
        return None
    # interned: every connection opened with one token shares one key string
    return sys.intern(hashlib.blake2b(token.encode(), digest_size=12).hexdigest())


class Admission:
    """Counts push connections (in all, per client, per token) and long polls against their caps."""

    __slots__ = ("_clients", "_tokens", "connections", "long_polls")

    def __init__(self) -> None:
        self.connections = 0
        """SSE streams and WebSockets admitted and not yet ended."""
        self.long_polls = 0
        """Requests waiting for an operation to change (``Prefer: wait``, ``?wait=``)."""
        self._clients: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def refusal(self, settings: Settings, client: str, token: str | None) -> str | None:
        """The cap a new connection of ``client`` with ``token`` (a :func:`token_key`) would pass, or ``None``.

        The cap is named by its limit reason (:data:`herald.metrics.LIMIT_REASONS`).
        """
        if self.connections >= settings.max_connections:
            return "connections-process"
        if self._clients.get(client, 0) >= settings.max_connections_per_client:
            return "connections-client"
        if token is not None and self._tokens.get(token, 0) >= settings.max_connections_per_token:
            return "connections-token"
        return None

    def admit(self, client: str, token: str | None) -> Seat:
        """Count a connection of ``client`` opened with ``token`` (check :meth:`refusal` first)."""
        client = sys.intern(client)
        self.connections += 1
        self._clients[client] = self._clients.get(client, 0) + 1
        if token is not None:
            self._tokens[token] = self._tokens.get(token, 0) + 1
        return Seat(client, token)

    def release(self, seat: Seat) -> None:
        """Let go of an admitted connection (once, when it ends)."""
        self.connections -= 1
        _decrement(self._clients, seat.client)
        if seat.token is not None:
            _decrement(self._tokens, seat.token)

    def begin_long_poll(self, limit: int) -> bool:
        """Take one of ``limit`` long-poll slots; ``False`` when none is free (answer at once, then)."""
        if self.long_polls >= limit:
            return False
        self.long_polls += 1
        return True

    def end_long_poll(self) -> None:
        """Give back the slot :meth:`begin_long_poll` took."""
        self.long_polls -= 1


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
