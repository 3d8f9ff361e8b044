"""A tiny raw Server-Sent Events client for tests: exact parsing, bounded waits.

:class:`SSEParser` turns bytes into :class:`Block` s — everything between two blank lines,
fields and comments kept in order, so a test can assert on ``retry:``, heartbeat comments,
``event:``, ``id:`` and ``data:`` exactly as the server framed them. :class:`SSEStream`
reads a streaming ``httpx`` response with a timeout on every wait, and keeps the raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass(slots=True)
class Block:
    """One SSE block: its ``(name, value)`` fields and its comments, in the order they came."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    def _last(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k == name]
        return values[-1] if values else None

    @property
    def event(self) -> str | None:
        """The ``event:`` field (``None`` when absent)."""
        return self._last("event")

    @property
    def id(self) -> str | None:
        """The ``id:`` field (``None`` when absent)."""
        return self._last("id")

    @property
    def retry(self) -> int | None:
        """The ``retry:`` field as an integer (``None`` when absent)."""
        raw = self._last("retry")
        return int(raw) if raw is not None else None

    @property
    def data(self) -> str | None:
        """The ``data:`` lines joined with newlines, as a browser does (``None`` when absent)."""
        lines = [v for k, v in self.fields if k == "data"]
        return "\n".join(lines) if lines else None

    def json(self) -> Any:
        """The data decoded as JSON."""
        assert self.data is not None, f"block has no data: {self}"
        return orjson.loads(self.data)

    @property
    def is_message(self) -> bool:
        """Whether a browser would dispatch this block as an event (it has data)."""
        return self.data is not None

    @property
    def is_heartbeat(self) -> bool:
        """A block of comments only."""
        return not self.fields and bool(self.comments)


class SSEParser:
    """Incremental parser: feed bytes, get the blocks completed so far."""

    def __init__(self) -> None:
        self._buffer = b""
        self._block = Block()

    def feed(self, chunk: bytes) -> list[Block]:
        """Parse ``chunk``; return every block it completed."""
        self._buffer += chunk
        out: list[Block] = []
        while True:
            # Lines end in \n, \r\n or \r (the spec allows all three).
            cut = -1
            for i, byte in enumerate(self._buffer):
                if byte in (10, 13):
                    cut = i
                    break
            if cut < 0:
                return out
            if self._buffer[cut] == 13 and cut + 1 == len(self._buffer):
                return out  # a lone \r might be the first half of \r\n: wait for more
            line = self._buffer[:cut].decode("utf-8")
            skip = 2 if self._buffer[cut : cut + 2] == b"\r\n" else 1
            self._buffer = self._buffer[cut + skip :]
            if line == "":
                if self._block.fields or self._block.comments:
                    out.append(self._block)
                self._block = Block()
            elif line.startswith(":"):
                self._block.comments.append(line[1:])
            else:
                name, colon, value = line.partition(":")
                if colon and value.startswith(" "):
                    value = value[1:]
                self._block.fields.append((name, value))


class SSEStream:
    """The blocks of one open SSE response, read with bounded waits."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.raw = b""
        self.ended = False
        self._parser = SSEParser()
        self._pending: list[Block] = []
        self._chunks = response.aiter_raw()

    async def next_block(self, timeout: float = 5.0) -> Block:
        """The next block; ``TimeoutError`` after ``timeout`` s, ``EOFError`` if the stream ended."""
        async with asyncio.timeout(timeout):
            while not self._pending:
                try:
                    chunk = await anext(self._chunks)
                except StopAsyncIteration:
                    self.ended = True
                    raise EOFError("the SSE stream ended") from None
                self.raw += chunk
                self._pending.extend(self._parser.feed(chunk))
        return self._pending.pop(0)

    async def next_message(self, timeout: float = 5.0) -> Block:
        """The next block that carries data (skipping heartbeats and ``retry:``-only blocks)."""
        async with asyncio.timeout(timeout):
            while True:
                block = await self.next_block(timeout)
                if block.is_message:
                    return block

    async def messages(self, count: int, timeout: float = 5.0) -> list[Block]:
        """The next ``count`` messages, within ``timeout`` seconds in all."""
        async with asyncio.timeout(timeout):
            return [await self.next_message(timeout) for _ in range(count)]

    async def until_end(self, timeout: float = 5.0) -> list[Block]:
        """Every remaining block, until the server ends the stream."""
        out: list[Block] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    out.append(await self.next_block(timeout))
                except EOFError:
                    return out


@contextlib.asynccontextmanager
async def sse_connect(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Any = None,
    timeout: float = 5.0,
) -> AsyncIterator[SSEStream]:
    """Open ``url`` as an SSE stream (the response may be an error: check ``stream.response``)."""
    request = client.build_request(
        "GET",
        url,
        headers={"Accept": "text/event-stream", **(headers or {})},
        params=params,
        timeout=httpx.Timeout(timeout, read=None),
    )
    async with asyncio.timeout(timeout):
        response = await client.send(request, stream=True)
    try:
        yield SSEStream(response)
    finally:
        await response.aclose()
