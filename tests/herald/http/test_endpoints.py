"""``/healthz``, ``/readyz``, ``/openapi.json`` and the chat page at ``/``."""

from __future__ import annotations

from tests.herald.http.harness import Herald, assert_problem

# The HTTP routes of the issue-2 contract, as (path in the OpenAPI document, method).
CONTRACT = [
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/chats/{room}/messages", "post"),
    ("/chats/{room}/messages/{message_id}/read", "post"),
    ("/operations/{operation_id}", "get"),
    ("/operations/{operation_id}", "delete"),
    ("/operations/{operation_id}/events", "get"),
    ("/topics/events", "get"),
    ("/topics/{topic}/events", "get"),
    ("/chats/{room}", "get"),
    ("/chats/{room}/messages", "get"),
    ("/chats/{room}/messages/{message_id}", "get"),
]


async def test_healthz(herald: Herald) -> None:
    response = await herald.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_while_the_broker_answers(herald: Herald) -> None:
    response = await herald.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_is_503_while_shutting_down(herald: Herald) -> None:
    herald.gateway.accepting = False
    response = await herald.client.get("/readyz")
    assert_problem(response, 503, "shutting-down")
    assert response.headers["retry-after"] == "1"


async def test_openapi_describes_every_route_of_the_contract(herald: Herald) -> None:
    response = await herald.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"]
    missing = [(path, method) for path, method in CONTRACT if method not in doc["paths"].get(path, {})]
    assert missing == []
    post = doc["paths"]["/chats/{room}/messages"]["post"]
    assert {"202", "400", "413", "415", "422"} <= set(post["responses"])
    assert post["requestBody"]["content"]["application/json"]["schema"]["required"] == ["author", "text"]
    assert "Problem" in doc["components"]["schemas"]


async def test_the_chat_page_is_served_at_the_root(herald: Herald) -> None:
    response = await herald.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "Herald" in response.text
