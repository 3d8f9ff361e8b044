"""Read receipts are atomic: readers who report at the same moment are all recorded, on either broker.

``record_read`` changes the stored message with ``update_resource`` (an atomic read-modify-write);
a handler that read the message, added its reader and wrote it back would drop the readers of every
other handler that wrote in between. Run against the memory broker and a real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.chat import message_path
from app.chat.handlers import record_read
from herald import Context
from herald.events import build_event
from herald.operations import Operation, Status, new_operation_id
from tests.herald.http.harness import Herald, in_process

READERS = [f"reader{n:02d}" for n in range(20)]


@pytest.fixture(params=["memory", pytest.param("redis", marks=[pytest.mark.redis])])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` (the memory broker) or the URL of the test session's Redis."""
    return None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def chat(broker_url: str | None) -> AsyncIterator[Herald]:
    """The chat app on either broker, its embedded worker taking all the receipts at once."""
    async with in_process(redis_url=broker_url, embedded_worker=True, worker_concurrency=len(READERS)) as herald:
        yield herald


@pytest.fixture
async def idle_chat(broker_url: str | None) -> AsyncIterator[Herald]:
    """The chat app on either broker without a worker: the test runs the handlers itself."""
    async with in_process(redis_url=broker_url, embedded_worker=False) as herald:
        yield herald


async def send(herald: Herald, room: str) -> dict[str, Any]:
    """Send a message and wait for it to be stored; the message."""
    response = await herald.send(room=room, text="read me", headers={"Prefer": "wait=5"})
    assert response.status_code == 200, response.text
    message: dict[str, Any] = response.json()["result"]
    return message


async def receipts_in_room(herald: Herald, room: str) -> list[str]:
    """The readers of the ``ChatMessageRead`` events in the room's topic."""
    page = await herald.broker.read(f"chats/{room}", None)
    return [s.event.data["reader"] for s in page.events if s.event.type == "ChatMessageRead"]


async def test_twenty_readers_at_once_are_all_recorded(chat: Herald) -> None:
    mid = (await send(chat, "crowd"))["id"]
    responses = await asyncio.gather(*(
        chat.client.post(f"/chats/crowd/messages/{mid}/read", json={"reader": reader}) for reader in READERS
    ))
    assert [r.status_code for r in responses] == [202] * len(READERS)
    for response in responses:
        await chat.wait_status(response.json()["id"], "succeeded", timeout=5)
    stored = (await chat.client.get(f"/chats/crowd/messages/{mid}")).json()
    assert sorted(stored["read_by"]) == READERS
    assert len(stored["read_by"]) == len(READERS)
    assert sorted(await receipts_in_room(chat, "crowd")) == READERS


async def test_twenty_record_read_handlers_running_together_lose_no_reader(idle_chat: Herald) -> None:
    # the handler itself, run concurrently as twenty workers would, each with its own operation
    room, mid = "together", "m_together01"
    broker = idle_chat.broker
    await broker.put_resource(message_path(room, mid), {
        "id": mid, "room": room, "author": "ann", "text": "read me", "sent_at": "2026-01-01T00:00:00.000Z",
        "delivered_at": "2026-01-01T00:00:00.001Z", "read_by": [], "operation_id": "op_unused"}, ttl=60)

    async def read_as(reader: str) -> None:
        op_id = new_operation_id()
        request = build_event("ChatMessageRead", {"room": room, "message_id": mid, "reader": reader},
                              source="test", correlationid=op_id)
        await broker.accept(Operation(id=op_id, type=request.type, request_event_id=request.id), request)
        operation = await broker.transition(op_id, Status.RUNNING)
        ctx = Context(broker, request, operation, source="test")
        await ctx.succeed(await record_read(ctx))

    await asyncio.gather(*(read_as(reader) for reader in READERS))
    stored = await broker.get_resource(message_path(room, mid))
    assert stored is not None
    assert sorted(stored["read_by"]) == READERS
    assert sorted(await receipts_in_room(idle_chat, room)) == READERS
