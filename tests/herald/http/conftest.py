"""Fixtures for the in-process HTTP tests (see :mod:`tests.herald.http.harness`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.herald.http.harness import Herald, LiveHerald, in_process, served


@pytest.fixture
async def make_herald() -> AsyncIterator[Callable[..., Awaitable[Herald]]]:
    """A factory of in-process apps with the given settings, all closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> Herald:
            return await stack.enter_async_context(in_process(**overrides))

        yield make


@pytest.fixture
async def herald(make_herald: Callable[..., Awaitable[Herald]]) -> Herald:
    """The default app: memory broker, chat worker in-process."""
    return await make_herald()


@pytest.fixture
async def idle_herald(make_herald: Callable[..., Awaitable[Herald]]) -> Herald:
    """An app without its embedded worker, so operations stay pending until a test moves them."""
    return await make_herald(embedded_worker=False)


@pytest.fixture
async def make_live() -> AsyncIterator[Callable[..., Awaitable[LiveHerald]]]:
    """A factory of apps served by uvicorn on free loopback ports, stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> LiveHerald:
            return await stack.enter_async_context(served(**overrides))

        yield make


@pytest.fixture
async def live(make_live: Callable[..., Awaitable[LiveHerald]]) -> LiveHerald:
    """The default app, served on a loopback port, with a small heartbeat."""
    return await make_live(heartbeat=0.2)
