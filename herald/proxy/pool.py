"""Connections to upstreams: keep-alive connections per origin, at most a limit of them in use at once.

Used by the workers that forward commands and by the gateway that forwards read routes and
cancels. Each origin has up to ``limit`` httpx clients of one connection each, lent to one request
at a time: a request waits for a free one without a deadline (the limit is back-pressure, not a
failure); its deadline runs from when it is sent, and covers the whole answer. One client per
connection, rather than one client of ``limit`` connections, because httpcore's pool walks all of
its connections (checking each socket) for every request: at 32 requests in flight that walk was most
of a forward's CPU (bench scenario R). The clients share one TLS context.

Answers are read up to ``max_response`` bytes. No redirect is followed, no proxy variable of the
environment is used: upstreams are the operator's own services, named in the configuration.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from herald.version import __version__

USER_AGENT = {"user-agent": f"herald/{__version__}"}

class AnswerTooLarge(Exception):
    """An upstream's answer is longer than the pool reads."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer, read in full: its status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


class UpstreamPool:
    """Keep-alive connections per upstream origin, with a limit on those in use at once."""

    def __init__(self, *, default_limit: int, max_response: int) -> None:
        self.default_limit = default_limit
        self.max_response = max_response
        self._wanted: dict[str, int] = {}
        self._idle: dict[str, list[httpx.AsyncClient]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._all: list[httpx.AsyncClient] = []
        self._tls: ssl.SSLContext | None = None

    def want(self, origin: str, limit: int | None) -> None:
        """Declare a user of ``origin`` with its limit (``None``: the default); the smallest declared wins."""
        wanted = self.default_limit if limit is None else limit
        self._wanted[origin] = min(wanted, self._wanted.get(origin, wanted))

    def limit(self, origin: str) -> int:
        """Requests in flight to ``origin`` at once."""
        return self._wanted.get(origin, self.default_limit)

    def _client(self, origin: str) -> httpx.AsyncClient:
        idle = self._idle.setdefault(origin, [])
        if idle:
            return idle.pop()
        if self._tls is None:
            self._tls = ssl.create_default_context()
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                                   verify=self._tls, follow_redirects=False, trust_env=False, headers=USER_AGENT)
        self._all.append(client)
        return client

    async def send(
        self,
        method: str,
        url: str,
        *,
        origin: str,
        headers: Mapping[str, str],
        timeout: float,
        content: bytes | None = None,
    ) -> Answer:
        """Send one request and read its answer within ``timeout`` seconds of sending it.

        Raises ``TimeoutError`` when the deadline passes, :class:`AnswerTooLarge`, or httpx's
        ``TransportError`` (connection refused or reset…).
        """
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(self.limit(origin))
        async with slots:
            client = self._client(origin)
            try:
                async with asyncio.timeout(timeout):
                    request = client.build_request(method, url, headers=headers, content=content,
                                                   timeout=httpx.Timeout(timeout))
                    response = await client.send(request, stream=True)
                    try:
                        body = bytearray()
                        async for chunk in response.aiter_bytes():  # decoded: the limit counts what is kept
                            body += chunk
                            if len(body) > self.max_response:
                                raise AnswerTooLarge(f"the answer is longer than {self.max_response} bytes")
                    finally:
                        await response.aclose()
            finally:
                self._idle[origin].append(client)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers.raw}
        return Answer(response.status_code, headers, bytes(body))

    async def aclose(self) -> None:
        """Close every client (their idle connections)."""
        clients, self._all, self._idle, self._slots = self._all, [], {}, {}
        for client in clients:
            await client.aclose()
