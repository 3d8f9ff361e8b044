"""Commands are answered by CommandMiddleware, inside CORS and bearer authentication, before the router."""

from __future__ import annotations

import httpx
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from herald.http.commands import CommandMiddleware
from tests.herald.hardening.conftest import JWT_SECRET, bearer
from tests.herald.http.harness import assert_problem, in_process

MESSAGE = {"author": "ann", "text": "hello"}
ORIGIN = "https://chat.example"


async def unreachable(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("the router's command route was reached")


async def test_a_command_is_answered_by_the_middleware_without_reaching_the_router() -> None:
    async with in_process() as herald:
        assert any(m.cls is CommandMiddleware for m in herald.app.user_middleware)
        [route] = [r for r in herald.app.routes if isinstance(r, Route) and r.name == "ChatMessageSent"]
        route.app = unreachable
        response = await herald.send()
        assert response.status_code == 202, response.text
        assert response.headers["location"] == response.json()["operation_url"]
        assert_problem(await herald.client.post("/chats/lobby/messages", json={"author": "ann"}), 422)


async def test_other_methods_on_a_command_path_are_left_to_the_router() -> None:
    async with in_process() as herald:
        assert (await herald.client.get("/chats/lobby/messages")).status_code == 200  # the room's read route
        assert_problem(await herald.client.put("/chats/lobby/messages", json=MESSAGE), 405)


async def test_a_cross_origin_command_gets_the_cors_headers_and_bearer_authentication_still_applies() -> None:
    async with in_process(cors_origins=(ORIGIN,), jwt_secret=JWT_SECRET) as herald:
        refused = await herald.client.post("/chats/lobby/messages", json=MESSAGE, headers={"Origin": ORIGIN})
        assert_problem(refused, 401)
        assert refused.headers["access-control-allow-origin"] == ORIGIN
        accepted = await herald.client.post("/chats/lobby/messages", json=MESSAGE,
                                            headers={"Origin": ORIGIN, **bearer("alice")})
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["access-control-allow-origin"] == ORIGIN


async def test_a_command_under_a_root_path_is_left_to_the_router_which_strips_it() -> None:
    async with in_process() as herald:
        transport = httpx.ASGITransport(app=herald.app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://herald.test") as client:
            response = await client.post("/api/chats/lobby/messages", json=MESSAGE)
        assert response.status_code == 202, response.text
