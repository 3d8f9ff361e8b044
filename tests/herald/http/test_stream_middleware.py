"""The push routes (SSE and /ws) are answered by PushMiddleware, inside CORS and bearer authentication."""

from __future__ import annotations

import asyncio

import orjson
from websockets.asyncio.client import connect

from herald.events import build_event
from herald.http.push import PushMiddleware
from tests.herald.http.harness import assert_problem, served
from tests.support.sse import sse_connect

ORIGIN = "https://chat.example"


async def test_a_cross_origin_stream_gets_the_cors_headers_and_its_events() -> None:
    async with served(cors_origins=(ORIGIN,)) as herald:
        assert any(m.cls is PushMiddleware for m in herald.app.user_middleware)
        token = herald.gateway.signer.issue(["news"])
        async with sse_connect(herald.client, f"/topics/news/events?token={token}",
                               headers={"Origin": ORIGIN}) as stream:
            assert stream.response.status_code == 200
            assert stream.response.headers["access-control-allow-origin"] == ORIGIN
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            await herald.broker.publish("news", build_event("bench.tick", {"n": 1}, source="test"))
            block = await stream.next_message()
            assert block.event == "bench.tick"


async def test_stream_routes_answer_problems_and_leave_other_methods_to_the_router() -> None:
    async with served() as herald:
        assert_problem(await herald.client.get("/topics/news/events"), 401, "invalid-token")
        assert_problem(await herald.client.get("/operations/op_nope/events?token=x"), 401, "invalid-token")
        assert (await herald.client.put("/topics/news/events")).status_code == 405
        # a POST there is the publish API's, answered by the router (no publisher key set: 401)
        assert_problem(await herald.client.post("/topics/news/events"), 401)
        assert (await herald.client.get("/healthz")).status_code == 200



async def test_a_websocket_on_ws_is_served_and_gets_its_topics_events() -> None:
    async with served() as herald:
        token = herald.gateway.signer.issue(["news"])
        async with connect(f"{herald.ws_url}/ws?topic=news&token={token}", open_timeout=5) as ws:
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
            await herald.broker.publish("news", build_event("bench.tick", {"n": 2}, source="test"))
            message = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert message["type"] == "event" and message["event"]["data"] == {"n": 2}
        assert (await herald.client.get("/ws")).status_code in (404, 405)  # a plain GET is not a socket
