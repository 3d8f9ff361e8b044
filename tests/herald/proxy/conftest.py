"""Fixtures of the command proxy's tests: in-process apps, and the upstream process shared by a module."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.herald.http.harness import Herald, in_process
from tests.herald.proxy.support import Upstream


@pytest.fixture
async def make_herald() -> AsyncIterator[Callable[..., Awaitable[Herald]]]:
    """A factory of in-process apps (``domains=``, settings overrides), all closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> Herald:
            return await stack.enter_async_context(in_process(**overrides))

        yield make


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """The test upstream (:mod:`tests.herald.proxy.upstream`), one process for the module's tests."""
    server = Upstream().start()
    try:
        yield server
    finally:
        server.stop()
