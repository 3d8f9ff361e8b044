"""``POST`` a command: 202 and its headers, Prefer, Idempotency-Key, and every bad-input answer."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.datastructures import QueryParams

from herald.http.gateway import query_value, query_values, request_header
from tests.herald.http.harness import Herald, assert_problem

MESSAGE = {"author": "ann", "text": "hello"}


async def test_post_answers_202_with_location_retry_after_and_the_urls(idle_herald: Herald) -> None:
    response = await idle_herald.send()
    assert response.status_code == 202
    body = response.json()
    assert re.fullmatch(r"op_[A-Za-z0-9_\-]{22}", body["id"])
    assert body["status"] == "pending"
    assert body["type"] == "ChatMessageSent"
    assert response.headers["location"] == f"/operations/{body['id']}"
    assert body["operation_url"] == response.headers["location"]
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    assert body["subscribe_url"].startswith(f"/operations/{body['id']}/events?token=")
    # relative: "herald.test" is not in HERALD_TRUSTED_HOSTS, so its Host header is not handed on
    assert body["websocket_url"].startswith(f"/ws?topic=operations/{body['id']}&token=")
    assert "preference-applied" not in response.headers
    assert "idempotent-replayed" not in response.headers


async def test_the_websocket_url_is_absolute_only_for_a_trusted_host_whatever_came_before(idle_herald: Herald) -> None:
    urls = []
    for host in ("localhost:8000", "evil.example", "localhost:8000", "127.0.0.1:9", "evil.example:8000"):
        response = await idle_herald.send(headers={"Host": host})
        assert response.status_code == 202, response.text
        urls.append(response.json()["websocket_url"].split("/ws?")[0])
    assert urls == ["ws://localhost:8000", "", "ws://localhost:8000", "ws://127.0.0.1:9", ""]


def test_the_websocket_origins_kept_stay_few_however_many_hosts_ask(idle_herald: Herald) -> None:
    gateway = idle_herald.gateway
    for i in range(600):
        conn = SimpleNamespace(scope={"headers": [(b"host", f"h{i}.example".encode())], "scheme": "https"})
        assert gateway.ws_base_url(conn) == ""  # type: ignore[arg-type]
    assert 0 < len(gateway._ws_origins) <= 256
    conn = SimpleNamespace(scope={"headers": [(b"host", b"localhost")], "scheme": "https"})
    assert gateway.ws_base_url(conn) == "wss://localhost"  # type: ignore[arg-type]


def test_a_request_header_is_the_first_of_its_name_and_follows_a_new_header_list() -> None:
    scope: dict[str, Any] = {"headers": [(b"host", b"a"), (b"prefer", b"wait=1"), (b"prefer", b"respond-async")]}
    assert (request_header(scope, b"prefer"), request_header(scope, b"host"), request_header(scope, b"x")) == (
        "wait=1", "a", None)
    scope["headers"] = [(b"host", b"b")]  # a middleware put another list in: read again, not the first one's
    assert (request_header(scope, b"host"), request_header(scope, b"prefer")) == ("b", None)


@pytest.mark.parametrize("query", [b"", b"token=a", b"topic=a&topic=b%2Fc&token=x&token=y", b"token=&x",
                                   b"q=a+b%20c&t=%E2%82%AC", b"a=1&&b=2;c=3", b"%3D=%26&last_event_id=5-1.abc"])
def test_query_values_read_as_starlettes_query_params(query: bytes) -> None:
    scope: dict[str, Any] = {"query_string": query}
    expected = QueryParams(query)
    values = query_values(scope)
    assert {name: expected.getlist(name) for name in expected} == values
    for name in ("token", "topic", "last_event_id", "q", "x", "missing"):
        assert query_value(scope, name) == expected.get(name)
    scope["query_string"] = b"token=other"  # another query in the same scope: parsed again
    assert query_value(scope, "token") == "other"


async def test_two_posts_make_two_operations(idle_herald: Herald) -> None:
    first, second = await idle_herald.send(), await idle_herald.send()
    assert first.json()["id"] != second.json()["id"]


async def test_a_json_content_type_with_parameters_or_suffix_is_accepted(idle_herald: Herald) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.herald+json", "APPLICATION/JSON"):
        response = await idle_herald.client.post("/chats/lobby/messages", content=b'{"author":"a","text":"t"}',
                                                 headers={"Content-Type": content_type})
        assert response.status_code == 202, (content_type, response.text)


# Prefer ---------------------------------------------------------------------------------------


async def test_prefer_wait_answers_200_with_the_finished_operation(herald: Herald) -> None:
    response = await herald.send(headers={"Prefer": "wait=5"})
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=5"
    body = response.json()
    assert body["status"] == "succeeded"
    assert body["result"]["text"] == "hello"
    assert body["location"] == f"/chats/lobby/messages/{body['result']['id']}"
    assert response.headers["content-location"] == f"/operations/{body['id']}"
    assert "retry-after" not in response.headers


async def test_prefer_wait_is_capped_by_max_wait_and_times_out_to_202(
    make_herald: Callable[..., Awaitable[Herald]],
) -> None:
    herald = await make_herald(embedded_worker=False, max_wait=1.0)
    response = await herald.send(headers={"Prefer": "wait=100"})
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=1"
    assert response.json()["status"] == "pending"
    assert response.headers["location"] == response.json()["operation_url"]


async def test_respond_async_always_answers_202(herald: Herald) -> None:
    response = await herald.send(headers={"Prefer": "respond-async, wait=5"})
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"


@pytest.mark.parametrize("prefer", ["wait=soon", "wait=-1", "handling=lenient", "respond-async=yes", ""])
async def test_preferences_not_understood_are_ignored(idle_herald: Herald, prefer: str) -> None:
    response = await idle_herald.send(headers={"Prefer": prefer})
    assert response.status_code == 202
    assert "preference-applied" not in response.headers


# Idempotency-Key -----------------------------------------------------------------------------


async def test_same_key_and_same_body_return_the_same_operation(idle_herald: Herald) -> None:
    key = {"Idempotency-Key": "k-1"}
    first = await idle_herald.client.post("/chats/lobby/messages", json={"author": "a", "text": "t"}, headers=key)
    again = await idle_herald.client.post("/chats/lobby/messages", json={"text": "t", "author": "a"}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    # one request event was queued, not two
    assert len(await idle_herald.broker.consume(["ChatMessageSent"], "test", count=10, block=0)) == 1


async def test_same_key_with_another_body_is_422_naming_no_operation_in_anonymous_mode(idle_herald: Herald) -> None:
    key = {"Idempotency-Key": "k-2"}
    first = await idle_herald.send(text="one", headers=key)
    response = await idle_herald.send(text="two", headers=key)
    doc = assert_problem(response, 422, "idempotency-key-reused")
    assert "operation_id" not in doc  # anonymous callers share one key space: say nothing of the other's
    assert first.json()["id"] not in response.text


async def test_same_key_on_another_command_path_is_422(idle_herald: Herald) -> None:
    key = {"Idempotency-Key": "k-3"}
    await idle_herald.send(room="a", headers=key)
    assert_problem(await idle_herald.send(room="b", headers=key), 422, "idempotency-key-reused")


async def test_a_replay_after_the_operation_finished_returns_it_finished(herald: Herald) -> None:
    key = {"Idempotency-Key": "k-4", "Prefer": "wait=5"}
    first = await herald.send(headers=key)
    again = await herald.send(headers=key)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["result"] == first.json()["result"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "caf\u00e9"])
async def test_a_bad_idempotency_key_is_400(idle_herald: Herald, key: str) -> None:
    response = await idle_herald.client.post("/chats/lobby/messages", json=MESSAGE,
                                             headers={"Idempotency-Key": key.encode()})
    assert_problem(response, 400, "bad-idempotency-key")


# Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"])
async def test_a_body_that_is_not_json_typed_is_415(idle_herald: Herald, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await idle_herald.client.post("/chats/lobby/messages", content=b'{"author":"a","text":"t"}',
                                             headers=headers)
    assert_problem(response, 415, "unsupported-media-type")
    assert response.headers["accept-post"] == "application/json"


async def test_a_body_over_max_body_is_413_by_content_length(
    make_herald: Callable[..., Awaitable[Herald]],
) -> None:
    herald = await make_herald(embedded_worker=False, max_body=100)
    response = await herald.send(text="x" * 200)
    doc = assert_problem(response, 413, "body-too-large")
    assert doc["max_body"] == 100


async def test_a_chunked_body_over_max_body_is_413(make_herald: Callable[..., Awaitable[Herald]]) -> None:
    herald = await make_herald(embedded_worker=False, max_body=100)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"author":"a","text":"'
        for _ in range(10):
            yield b"x" * 20
        yield b'"}'

    response = await herald.client.post("/chats/lobby/messages", content=chunks(),
                                        headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body-too-large")


async def test_a_chunked_body_within_max_body_is_accepted(idle_herald: Herald) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"author":"a",'
        yield b'"text":"t"}'

    response = await idle_herald.client.post("/chats/lobby/messages", content=chunks(),
                                             headers={"Content-Type": "application/json"})
    assert response.status_code == 202


async def test_a_non_numeric_content_length_is_400(idle_herald: Herald) -> None:
    request = idle_herald.client.build_request("POST", "/chats/lobby/messages", content=b"{}",
                                               headers={"Content-Type": "application/json"})
    request.headers["Content-Length"] = "abc"
    assert_problem(await idle_herald.client.send(request), 400, "bad-request")


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"author": "a", "text": }', b"\xff\xfe{}", b'{"author":"\xe9"}', b"NaN"],
    ids=["empty", "truncated", "syntax", "utf16-bom", "latin1", "nan"],
)
async def test_invalid_json_or_utf8_is_400(idle_herald: Herald, body: bytes) -> None:
    response = await idle_herald.client.post("/chats/lobby/messages", content=body,
                                             headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "invalid-json")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "t"}, "author"),
        ({"author": "", "text": "t"}, "author"),
        ({"author": "   ", "text": "t"}, "author"),
        ({"author": 5, "text": "t"}, "author"),
        ({"author": "a" * 65, "text": "t"}, "author"),
        ({"author": "a\nb", "text": "t"}, "author"),
        ({"author": "a"}, "text"),
        ({"author": "a", "text": ""}, "text"),
        ({"author": "a", "text": ["t"]}, "text"),
        ({"author": "a", "text": "t", "extra": 1}, "extra"),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(idle_herald: Herald, body: dict[str, Any], field: str) -> None:
    response = await idle_herald.client.post("/chats/lobby/messages", json=body)
    doc = assert_problem(response, 422, "invalid-command")
    assert doc["field"] == field


@pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"5", b"null"])
async def test_a_body_that_is_not_an_object_is_422(idle_herald: Herald, body: bytes) -> None:
    response = await idle_herald.client.post("/chats/lobby/messages", content=body,
                                             headers={"Content-Type": "application/json"})
    assert_problem(response, 422, "invalid-command")


async def test_a_too_long_message_is_422_with_its_limit(idle_herald: Herald) -> None:
    doc = assert_problem(await idle_herald.send(text="x" * 2001), 422, "message-too-long")
    assert doc["max_length"] == 2000


@pytest.mark.parametrize("room", ["-lead", "a" * 65, "sp%20ace", "lobby%0A", "%C3%A9"])
async def test_an_impossible_room_is_404(idle_herald: Herald, room: str) -> None:
    response = await idle_herald.client.post(f"/chats/{room}/messages", json=MESSAGE)
    assert_problem(response, 404, "no-such-room")


async def test_get_on_a_command_path_is_405_problem(idle_herald: Herald) -> None:
    response = await idle_herald.client.put("/chats/lobby/messages", json=MESSAGE)
    assert_problem(response, 405)


async def test_an_unknown_path_is_404_problem(idle_herald: Herald) -> None:
    assert_problem(await idle_herald.client.get("/nope"), 404)


async def test_a_command_is_not_accepted_while_shutting_down(idle_herald: Herald) -> None:
    idle_herald.gateway.accepting = False
    response = await idle_herald.send()
    assert_problem(response, 503, "shutting-down")
    assert response.headers["retry-after"] == "1"
