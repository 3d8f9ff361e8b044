"""The callback API, in process: its token, idempotent events, topics the token opens, and results.

The app serves one proxied command without its embedded worker; each test plays the upstream,
with a callback token minted as a worker mints it (the gateway's signer, the same secret).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jwt
import pytest

from herald import Domain
from herald.auth import TokenSigner
from herald.operations import operation_topic
from tests.herald.http.harness import Herald, assert_problem
from tests.support.server import TEST_SECRET

BEARER_SECRET = "a-bearer-secret-for-commands-0123456789"


def domain() -> Domain:
    things = Domain("things")
    things.proxy("POST", "/things/{kind}", event="ThingRequested", upstream="http://127.0.0.1:9/things/{kind}",
                 topics=["things/{kind}"])
    return things


@pytest.fixture
async def app(make_herald: Callable[..., Awaitable[Herald]]) -> Herald:
    return await make_herald(domains=[domain()], embedded_worker=False)


async def operation(herald: Herald, kind: str = "chairs") -> str:
    response = await herald.client.post(f"/things/{kind}", json={"n": 1})
    assert response.status_code == 202, response.text
    op_id: str = response.json()["id"]
    return op_id


def token(op_id: str, topics: tuple[str, ...] = ("things/chairs",)) -> dict[str, str]:
    return {"Authorization": "Bearer " + TokenSigner(TEST_SECRET).issue_callback(op_id, topics=topics, ttl=60)}


def event(event_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": event_id, "type": "ThingMade", "source": "/upstream", "data": {"n": 1}, **extra}


async def types_in(herald: Herald, topic: str) -> list[str]:
    return [stored.event.type for stored in (await herald.broker.read(topic, None)).events]


async def test_events_go_to_the_operation_and_to_the_topics_the_token_opens(app: Herald) -> None:
    op_id = await operation(app)
    response = await app.client.post(f"/operations/{op_id}/events", headers=token(op_id),
                                     json=[event("e1", topics=["things/chairs"]), event("e2")])
    assert response.status_code == 200, response.text
    assert [(e["id"], e["duplicate"]) for e in response.json()["events"]] == [("e1", False), ("e2", False)]
    assert await types_in(app, operation_topic(op_id)) == ["ThingMade", "ThingMade"]
    [stored] = (await app.broker.read("things/chairs", None)).events
    doc = stored.event.to_dict()
    assert (doc["id"], doc["correlationid"], doc["source"]) == ("e1", op_id, "/upstream")
    assert "topics" not in doc  # Herald's routing, not part of the published event
    op = await app.broker.get_operation(op_id)
    assert op is not None and doc["causationid"] == op.request_event_id


async def test_a_repeated_event_id_is_not_published_twice(app: Herald) -> None:
    op_id = await operation(app)
    first = await app.client.post(f"/operations/{op_id}/events", headers=token(op_id), json=event("e1"))
    again = await app.client.post(f"/operations/{op_id}/events", headers=token(op_id),
                                  json=[event("e1"), event("e2"), event("e2")])
    assert first.json()["events"][0]["duplicate"] is False
    assert [(e["id"], e["duplicate"]) for e in again.json()["events"]] == [("e1", True), ("e2", False), ("e2", True)]
    assert await types_in(app, operation_topic(op_id)) == ["ThingMade", "ThingMade"]


async def test_a_topic_the_token_does_not_open_refuses_the_whole_call(app: Herald) -> None:
    op_id = await operation(app)
    response = await app.client.post(f"/operations/{op_id}/events", headers=token(op_id),
                                     json=[event("e1"), event("e2", topics="things/chairs things/tables")])
    assert_problem(response, 403, "forbidden-topic")
    assert await types_in(app, operation_topic(op_id)) == []


async def test_the_token_of_another_operation_is_refused(app: Herald) -> None:
    mine, other = await operation(app), await operation(app)
    for path, body in (("events", event("e1")), ("result", {"status": "succeeded"})):
        response = await app.client.post(f"/operations/{mine}/{path}", headers=token(other), json=body)
        assert_problem(response, 403, "forbidden-token")
    op = await app.broker.get_operation(mine)
    assert op is not None and op.status.value == "pending"


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer nonsense", "Basic abc", "Bearer " + TokenSigner(TEST_SECRET).issue(["operations/x"]),
     "Bearer " + TokenSigner("another-secret-0123456789abcdef").issue_callback("OP", ttl=60)],
    ids=["none", "garbage", "basic", "subscribe-token", "other-secret"],
)
async def test_no_valid_callback_token_is_401(app: Herald, authorization: str | None) -> None:
    op_id = await operation(app)
    headers = {"Authorization": authorization.replace("OP", op_id)} if authorization else {}
    response = await app.client.post(f"/operations/{op_id}/result", headers=headers, json={"status": "succeeded"})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_result_ends_the_operation_once_and_a_repeat_is_409_changing_nothing(app: Herald) -> None:
    op_id = await operation(app)
    done = {"status": "succeeded", "result": {"made": 3}, "location": "/things/chairs/3"}
    response = await app.client.post(f"/operations/{op_id}/result", headers=token(op_id), json=done)
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["result"]) == ("succeeded", {"made": 3})
    redirect = await app.client.get(f"/operations/{op_id}")
    assert (redirect.status_code, redirect.headers["location"]) == (303, "/things/chairs/3")
    for late in (done, {"status": "failed", "error": {"title": "Too late", "status": 500}}):
        response = await app.client.post(f"/operations/{op_id}/result", headers=token(op_id), json=late)
        assert_problem(response, 409, "operation-ended")
    after = (await app.client.get(f"/operations/{op_id}", params={"view": "status"})).json()
    assert (after["status"], after["result"], after["error"]) == ("succeeded", {"made": 3}, None)
    late_event = await app.client.post(f"/operations/{op_id}/events", headers=token(op_id), json=event("late"))
    assert_problem(late_event, 409, "operation-ended")


async def test_a_failed_result_carries_the_upstreams_problem(app: Herald) -> None:
    op_id = await operation(app)
    problem = {"type": "https://up/problems/x", "title": "Could not", "status": 422, "detail": "no", "hint": 1}
    response = await app.client.post(f"/operations/{op_id}/result", headers=token(op_id),
                                     json={"status": "failed", "error": problem})
    assert response.status_code == 200
    assert response.json()["error"] == problem


@pytest.mark.parametrize(
    "body",
    [{"status": "done"}, {"status": "succeeded", "error": {}}, {"status": "failed", "result": 1},
     {"status": "succeeded", "location": "http://elsewhere/x"}, {"status": "failed", "error": "oops"},
     {"status": "succeeded", "extra": 1}, ["succeeded"]],
)
async def test_a_result_that_is_not_one_is_422(app: Herald, body: Any) -> None:
    op_id = await operation(app)
    response = await app.client.post(f"/operations/{op_id}/result", headers=token(op_id), json=body)
    assert_problem(response, 422, "invalid-result")


@pytest.mark.parametrize(
    "body",
    [{"type": "ThingMade"}, event("e1", correlationid="op_someone_else"), event("e1", topics=[1]),
     event("e1", type="not a type"), [], "text"],
)
async def test_an_event_that_is_not_one_is_422(app: Herald, body: Any) -> None:
    op_id = await operation(app)
    response = await app.client.post(f"/operations/{op_id}/events", headers=token(op_id), json=body)
    assert response.status_code == 422, response.text
    assert await types_in(app, operation_topic(op_id)) == []


async def test_the_callback_api_checks_its_own_token_when_bearer_auth_is_on(
    make_herald: Callable[..., Awaitable[Herald]],
) -> None:
    herald = await make_herald(domains=[domain()], embedded_worker=False, jwt_secret=BEARER_SECRET)
    bearer = jwt.encode({"sub": "ann", "exp": 2_000_000_000}, BEARER_SECRET, algorithm="HS256")
    response = await herald.client.post("/things/chairs", json={}, headers={"Authorization": f"Bearer {bearer}"})
    op_id = response.json()["id"]
    result = await herald.client.post(f"/operations/{op_id}/result", headers=token(op_id), json={"status": "canceled"})
    assert result.status_code == 200, result.text
    assert result.json()["status"] == "canceled"
    refused = await herald.client.post(f"/operations/{op_id}/result", json={"status": "canceled"},
                                       headers={"Authorization": f"Bearer {bearer}"})
    assert_problem(refused, 401)


async def test_an_unknown_operation_is_404(app: Herald) -> None:
    response = await app.client.post("/operations/op_nobody/result", headers=token("op_nobody"),
                                     json={"status": "succeeded"})
    assert_problem(response, 404, "operation-not-found")
    assert isinstance(response, httpx.Response)
