"""The chat's worker side: deliver messages, record read receipts."""

from __future__ import annotations

from typing import Any

from app.chat.domain import MESSAGE_TTL, chat, message_id_for, message_path, room_topic
from herald import Context, Failed, now_iso


@chat.handler("ChatMessageSent")
async def deliver_message(ctx: Context) -> dict[str, Any]:
    """``ChatMessageSent`` → store the message, succeed with a 303 target and ``ChatMessageDelivered``.

    No cancel check of its own: the worker has just refused to start an operation whose cancel
    was requested, and storing is the first step. The event is staged, so it goes out with the
    success and the request's ack in one round trip.
    """
    data = ctx.data
    room = data["room"]
    mid = message_id_for(ctx.operation_id)
    path = message_path(room, mid)
    # a redelivered request keeps the message its first run stored (same id, same delivered_at)
    message = await ctx.put_resource_if_absent(path, {
        "id": mid,
        "room": room,
        "author": data["author"],
        "text": data["text"],
        "sent_at": ctx.event.time,
        "delivered_at": now_iso(),
        "read_by": [],
        "operation_id": ctx.operation_id,
    }, ttl=MESSAGE_TTL)
    ctx.stage("ChatMessageDelivered", message, topics=[room_topic(room)], subject=path)
    await ctx.succeed(message, location=path)
    return message


@chat.handler("ChatMessageRead")
async def record_read(ctx: Context) -> dict[str, Any]:
    """``ChatMessageRead`` → add the reader to the message (atomically), tell the room with the success."""
    data = ctx.data
    room, mid, reader = data["room"], data["message_id"], data["reader"]
    path = message_path(room, mid)
    added = False

    def add_reader(message: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal added
        added = reader not in message["read_by"]
        return {**message, "read_by": [*message["read_by"], reader]} if added else None

    if await ctx.update_resource(path, add_reader, ttl=MESSAGE_TTL) is None:
        raise Failed("No such message", f"there is no message {mid} in room {room}", status=404)
    receipt = {"room": room, "message_id": mid, "reader": reader, "read_at": now_iso()}
    if added:
        ctx.stage("ChatMessageRead", receipt, topics=[room_topic(room)], subject=path)
    return receipt
