"""The SSE routes are answered by EventStreamMiddleware, inside CORS and bearer authentication."""

from __future__ import annotations

from app.events import build_event
from app.http.push import EventStreamMiddleware
from tests.http.harness import assert_problem, served
from tests.support.sse import sse_connect

ORIGIN = "https://chat.example"


async def test_a_cross_origin_stream_gets_the_cors_headers_and_its_events() -> None:
    async with served(cors_origins=(ORIGIN,)) as herald:
        assert any(m.cls is EventStreamMiddleware for m in herald.app.user_middleware)
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
        assert (await herald.client.post("/topics/news/events")).status_code == 405
        assert (await herald.client.get("/healthz")).status_code == 200

