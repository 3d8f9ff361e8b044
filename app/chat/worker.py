"""The chat worker: delivers messages and records read receipts."""

from __future__ import annotations

import hashlib
from typing import Any

from app.chat import message_path, room_topic
from app.events import now_iso
from app.worker import Context, Failed, Handler
from app.worker import WorkerSettings as BaseWorkerSettings

MESSAGE_TTL = 7 * 86400


def message_id_for(operation_id: str) -> str:
    """The message id, derived from the operation so a redelivered request writes the same message."""
    return "m_" + hashlib.sha256(operation_id.encode()).hexdigest()[:20]


async def deliver_message(ctx: Context) -> dict[str, Any]:
    """``ChatMessageSent`` → store the message, succeed with a 303 target and ``ChatMessageDelivered``.

    No cancel check of its own: the worker SDK has just refused to start an operation whose cancel
    was requested (a re-read here cost a round trip per message), and storing is the first step.
    The event is staged, so it goes out with the success and the request's ack in one round trip.
    """
    data = ctx.data
    room = data["room"]
    mid = message_id_for(ctx.operation_id)
    path = message_path(room, mid)
    # a redelivered request keeps the message its first run stored (same id, same delivered_at)
    message = await ctx.broker.put_resource_if_absent(path, {
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


async def record_read(ctx: Context) -> dict[str, Any]:
    """``ChatMessageRead`` → add the reader to the message, tell the room (staged: it goes out with the success)."""
    data = ctx.data
    room, mid, reader = data["room"], data["message_id"], data["reader"]
    path = message_path(room, mid)
    message = await ctx.broker.get_resource(path)
    if message is None:
        raise Failed("No such message", f"there is no message {mid} in room {room}", status=404)
    receipt = {"room": room, "message_id": mid, "reader": reader, "read_at": now_iso()}
    if reader not in message["read_by"]:
        message["read_by"] = [*message["read_by"], reader]
        await ctx.broker.put_resource(path, message, ttl=MESSAGE_TTL)
        ctx.stage("ChatMessageRead", receipt, topics=[room_topic(room)], subject=path)
    return receipt


class WorkerSettings(BaseWorkerSettings):
    """``python -m app.worker app.chat.worker:WorkerSettings`` (the default)."""

    handlers: dict[str, Handler] = {"ChatMessageSent": deliver_message, "ChatMessageRead": record_read}
