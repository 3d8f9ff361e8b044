"""Builders and a bounded wait shared by the broker tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from herald.events import Event, build_event
from herald.operations import Operation, new_operation_id

REQUEST = "ThingRequested"


def command(type_: str = REQUEST, *, op_id: str | None = None, **data: Any) -> tuple[Operation, Event]:
    """A new operation and its request event, as the gateway builds them (``op_id``: from ``broker.operation_id``)."""
    op_id = op_id or new_operation_id()
    request = build_event(type_, data, source="test", correlationid=op_id)
    return Operation(id=op_id, type=type_, request_event_id=request.id), request


def event(n: int, type_: str = "ThingHappened") -> Event:
    """A response/domain event numbered ``n``."""
    return build_event(type_, {"n": n}, source="test")


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
