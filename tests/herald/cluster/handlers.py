"""Test-only worker handlers, run as ``python -m herald.worker tests.herald.cluster.handlers:FaultSettings``.

They answer ``ChatMessageSent`` (a command every gateway has) and do what the message's text
says, so a test chooses a job's behaviour with the body it POSTs:

* ``"sleep <s>"``       — sleep ``s`` seconds on every attempt, then deliver;
* ``"sleep-first <s>"`` — sleep ``s`` seconds on the first attempt only, then deliver;
* ``"crash"``           — end the whole process with ``os._exit`` (a crash, not an exception);
* anything else         — deliver at once.

Each invocation first counts itself in Redis through the broker's shared counter
(``herald:count:{invocations:<operation id>}``) and publishes a ``herald.operation.progress``
event naming the worker and the attempt, so a test knows who holds a job before it kills
that process. Delivering is idempotent: the message resource is keyed by the operation and
written once, so a redelivered job repeats no side effect.
"""

from __future__ import annotations

import asyncio
import os

from app.chat import message_path, room_topic
from herald.worker import Context, Handler, WorkerSettings

COUNT_TTL = 3600


async def faulty_send(ctx: Context) -> dict[str, object]:
    """``ChatMessageSent`` with the behaviour its text names."""
    invocation = await ctx.broker.hit(f"invocations:{ctx.operation_id}", COUNT_TTL)
    await ctx.progress({"worker": ctx.source, "invocation": invocation})
    verb, _, arg = str(ctx.data["text"]).partition(" ")
    if verb == "crash":
        os._exit(3)
    if verb == "sleep" or (verb == "sleep-first" and invocation == 1):
        await asyncio.sleep(float(arg))
    room = ctx.data["room"]
    path = message_path(room, "m_" + ctx.operation_id)
    message = await ctx.broker.get_resource(path)
    if message is None:  # the side effect happens once, however often the job runs
        message = {"room": room, "text": ctx.data["text"], "written_by": ctx.source}
        await ctx.broker.put_resource(path, message, ttl=COUNT_TTL)
    await ctx.emit("ChatMessageDelivered", {**message, "delivered_by": ctx.source}, topics=[room_topic(room)])
    return {"path": path, "delivered_by": ctx.source}


class FaultSettings(WorkerSettings):
    """The faulty handler with the default grace: a job in hand on SIGTERM gets 10 s to finish."""

    handlers: dict[str, Handler] = {"ChatMessageSent": faulty_send}


class ShortGraceSettings(FaultSettings):
    """The same, but a job still running half a second after SIGTERM is given back."""

    shutdown_grace = 0.5
