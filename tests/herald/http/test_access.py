"""Topic rules (anyone | token | owner) and which requests need a bearer, on a domain that is not the chat."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from herald import Context, Domain, Gateway
from tests.herald.http.harness import assert_problem, in_process, served
from tests.support.sse import sse_connect

JWT_SECRET = "access-test-jwt-secret-0123456789"


def make_domain() -> Domain:
    """A board whose notices are open to anyone, drafts need a token, inboxes are their owner's."""
    board = Domain("board")
    board.topic("notices/{board}", subscribe="anyone")
    board.topic("drafts/{board}", subscribe="token")
    board.topic("inbox/{user}", subscribe="owner")

    @board.command("POST", "/notices/{board}", event="NoticePosted",
                   schema={"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}})
    def post(params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return {"board": params["board"], "text": body["text"]}

    @board.handler("NoticePosted")
    async def publish(ctx: Context) -> None:
        ctx.stage("NoticePublished", ctx.data, topics=[f"notices/{ctx.data['board']}"])
        await ctx.succeed(ctx.data)

    @board.route("GET", "/inbox/{user}")
    async def inbox(request: Request) -> Response:
        """The caller's inbox URLs, with a token issued to the caller."""
        topic = f"inbox/{request.path_params['user']}"
        urls = Gateway.of(request).topic_urls(request, [topic], subject=request.scope.get("herald.subject"))
        return JSONResponse(urls)

    @board.route("GET", "/about", public=True)
    async def about(request: Request) -> Response:
        """What this board is (open to anyone, also with authentication on)."""
        return JSONResponse({"board": "test"})

    return board


def bearer(subject: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": subject, "iat": now, "exp": now + 300}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def test_an_anyone_topic_streams_without_a_token() -> None:
    async with served(domains=[make_domain()]) as live:
        async with sse_connect(live.client, "/topics/notices/lobby/events") as stream:
            assert stream.response.status_code == 200
            posted = await live.client.post("/notices/lobby", json={"text": "hello"})
            assert posted.status_code == 202
            block = await stream.next_message()
        assert block.event == "NoticePublished"
        assert block.json()["data"] == {"board": "lobby", "text": "hello"}


@pytest.mark.parametrize("topic", ["drafts/lobby", "inbox/ann", "somewhere/else"])
async def test_other_topics_need_a_token(topic: str) -> None:
    async with in_process(domains=[make_domain()]) as herald:
        assert_problem(await herald.client.get(f"/topics/{topic}/events"), 401, "invalid-token")
        token = herald.gateway.signer.issue(["notices/lobby"])
        assert_problem(await herald.client.get(f"/topics/{topic}/events", params={"token": token}), 403,
                       "forbidden-topic")


async def test_a_mix_of_open_and_guarded_topics_checks_the_token_for_the_guarded_ones() -> None:
    async with in_process(domains=[make_domain()]) as herald:
        params = [("topic", "notices/lobby"), ("topic", "drafts/lobby")]
        assert_problem(await herald.client.get("/topics/events", params=params), 401, "invalid-token")


async def test_an_owner_topic_opens_only_to_the_subject_its_token_was_issued_to() -> None:
    async with served(domains=[make_domain()], jwt_secret=JWT_SECRET) as live:
        urls = (await live.client.get("/inbox/ann", headers=bearer("ann"))).json()
        token = urls["subscribe_url"].split("token=")[1]
        # the owner, with or without her bearer (an EventSource sends none)
        for headers in ({}, bearer("ann")):
            async with sse_connect(live.client, f"/topics/inbox/ann/events?token={token}", headers=headers) as stream:
                assert stream.response.status_code == 200
        # someone else holding her token is refused
        response = await live.client.get(f"/topics/inbox/ann/events?token={token}", headers=bearer("bob"))
        assert_problem(response, 403, "forbidden-topic")
        # a token for the topic that names no subject does not open an owner topic
        anonymous = live.gateway.signer.issue(["inbox/ann"])
        assert_problem(await live.client.get(f"/topics/inbox/ann/events?token={anonymous}"), 403, "forbidden-topic")


async def test_without_authentication_an_owner_topic_needs_only_its_token() -> None:
    async with served(domains=[make_domain()]) as live:
        token = live.gateway.signer.issue(["inbox/ann"])
        async with sse_connect(live.client, f"/topics/inbox/ann/events?token={token}") as stream:
            assert stream.response.status_code == 200


async def test_bearer_rules_follow_routes_not_path_suffixes() -> None:
    async with in_process(jwt_secret=JWT_SECRET) as herald:  # the chat application
        # a room named "events": a domain read route, so it needs a bearer like any other room
        assert_problem(await herald.client.get("/chats/events"), 401, "unauthorized")
        assert (await herald.client.get("/chats/events", headers=bearer("ann"))).status_code == 200
        # the push routes are opened by subscribe tokens instead: no bearer asked for
        assert_problem(await herald.client.get("/topics/chats/events/events"), 401, "invalid-token")
        assert_problem(await herald.client.get("/operations/op_nope/events"), 401, "invalid-token")
        # commands and operations need one
        assert_problem(await herald.client.post("/chats/lobby/messages", json={"author": "a", "text": "b"}), 401,
                       "unauthorized")
        assert_problem(await herald.client.get("/operations/op_nope"), 401, "unauthorized")
        # what is not a domain's or an operation's stays open
        assert (await herald.client.get("/healthz")).status_code == 200
        assert (await herald.client.get("/openapi.json")).status_code == 200


async def test_a_public_read_route_needs_no_bearer_and_the_others_do() -> None:
    async with in_process(domains=[make_domain()], jwt_secret=JWT_SECRET) as herald:
        assert (await herald.client.get("/about")).json() == {"board": "test"}
        assert_problem(await herald.client.get("/inbox/ann"), 401, "unauthorized")
