"""The naive Python push gateway: the one a team writes first, kept as the bench's baseline.

starlette + sse-starlette's ``EventSourceResponse``, and for every SSE or WebSocket connection
its own Redis pub/sub subscription (so its own Redis connection) on the channel named by the URL.
Commands (scenario D) are pushed on a Redis list and handled by ``python -m bench.baselines.naive
worker``, which publishes a correlated event on the room's channel. Nothing here is tuned: it
is what the issue calls "the naive Python gateway", run under the same uvicorn flags as Herald.

Routes: ``GET /sse/{channel}``, ``WS /ws/{channel}`` (sends ``{"type":"subscribed"}`` once
subscribed, then each message as a text frame), ``POST /commands/{room}`` → ``202``,
``GET /healthz``. The Redis URL comes from ``NAIVE_REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator

import orjson
import redis.asyncio as aioredis
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

REQUESTS = "naive:requests"


def _redis_url() -> str:
    url = os.environ.get("NAIVE_REDIS_URL")
    if not url:
        raise SystemExit("NAIVE_REDIS_URL is required (the bench passes its own Redis)")
    return url


def create_app() -> Starlette:
    """The naive gateway's ASGI app."""
    # one pub/sub connection per subscriber is the design being measured: no pool cap (redis-py's default is 100)
    redis = aioredis.Redis.from_url(_redis_url(), max_connections=1_000_000)

    async def healthz(request: Request) -> Response:
        await redis.ping()
        return Response(b"ok")

    async def sse(request: Request) -> EventSourceResponse:
        channel = request.path_params["channel"]
        pubsub = redis.pubsub()
        await pubsub.subscribe(channel)

        async def stream() -> AsyncIterator[dict[str, str]]:
            try:
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        yield {"event": "message", "data": message["data"].decode()}
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.unsubscribe(channel)
                await pubsub.aclose()

        return EventSourceResponse(stream())

    async def ws(websocket: WebSocket) -> None:
        channel = websocket.path_params["channel"]
        await websocket.accept()
        pubsub = redis.pubsub()
        await pubsub.subscribe(channel)
        await websocket.send_text('{"type":"subscribed"}')

        async def pump() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    await websocket.send_text(message["data"].decode())

        async def read() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(read())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await pubsub.aclose()

    async def command(request: Request) -> Response:
        op_id = "op_" + secrets.token_urlsafe(16)
        body = orjson.loads(await request.body())
        await redis.lpush(REQUESTS, orjson.dumps({"id": op_id, "room": request.path_params["room"], "body": body}))
        return Response(orjson.dumps({"id": op_id, "status": "pending"}), status_code=202,
                        media_type="application/json", headers={"Location": f"/operations/{op_id}"})

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/sse/{channel:path}", sse),
        WebSocketRoute("/ws/{channel:path}", ws),
        Route("/commands/{room:path}", command, methods=["POST"]),
    ])


async def worker() -> None:
    """Take commands off the list and publish a correlated CloudEvents-shaped event on the room."""
    redis = aioredis.Redis.from_url(_redis_url())
    while True:
        item = await redis.blpop([REQUESTS], timeout=1)
        if item is None:
            continue
        request = orjson.loads(item[1])
        event = {
            "specversion": "1.0", "id": secrets.token_urlsafe(16), "source": "naive", "type": "ChatMessageDelivered",
            "datacontenttype": "application/json", "correlationid": request["id"], "data": request["body"],
        }
        await redis.publish(request["room"], orjson.dumps(event))


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        raise SystemExit("usage: python -m bench.baselines.naive worker")
    import uvloop

    uvloop.run(worker())
