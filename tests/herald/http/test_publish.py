"""``POST /topics/{topic}/events`` in process: events land in the history, tokens and limits are enforced.

The live half (curl, a browser and a WebSocket following the room, a rate limit and two gateways on
Redis) is in ``tests/app/browser/test_publish.py`` and ``tests/herald/e2e/test_publish.py``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import orjson
import pytest

from herald.http.publish import PatternError, allows, compile_pattern, publish_patterns
from herald.settings import Settings, SettingsError
from tests.herald.http.harness import Herald, assert_problem

PUBLISH_KEY = "publisher-key-for-tests-0123456789abcdef"
USER_KEY = "user-bearer-key-for-tests-0123456789abcdef"
MakeHerald = Callable[..., Awaitable[Herald]]


def token(patterns: list[str] | None, *, sub: str = "billing", key: str = PUBLISH_KEY, ttl: int = 60,
          **claims: Any) -> str:
    """A publisher token for ``patterns`` (``None``: no ``herald.publish`` claim at all)."""
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + ttl, **claims}
    if patterns is not None:
        body["herald"] = {"publish": patterns}
    return jwt.encode(body, key, "HS256")


ROOMS = ["chats/*"]


def bearer(patterns: list[str] | None = ROOMS, **kwargs: Any) -> dict[str, str]:
    """The ``Authorization`` header of :func:`token` (default: every chat room)."""
    return {"Authorization": "Bearer " + token(patterns, **kwargs)}


@pytest.fixture
async def publisher(make_herald: MakeHerald) -> Herald:
    """The chat app with a publisher key, no worker (only published events reach the topics)."""
    return await make_herald(publish_jwt_secret=PUBLISH_KEY, embedded_worker=False)


async def history(herald: Herald, topic: str) -> list[dict[str, Any]]:
    """The envelopes kept in ``topic``'s history, oldest first, with their cursors as ``_cursor``."""
    page = await herald.broker.read(topic, None)
    return [{**orjson.loads(stored.event.encoded), "_cursor": stored.cursor} for stored in page.events]


# Publishing --------------------------------------------------------------------------------------

async def test_one_event_is_stored_with_its_defaults_filled_in_and_answered_with_its_cursor(
    publisher: Herald,
) -> None:
    response = await publisher.client.post("/topics/chats/lobby/events", headers=bearer(),
                                           json={"type": "PriceChanged", "data": {"sku": "a", "price": 3}})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    [answer] = response.json()["events"]
    [stored] = await history(publisher, "chats/lobby")
    assert answer == {"id": stored["id"], "cursor": stored["_cursor"]}
    assert stored["specversion"] == "1.0" and stored["type"] == "PriceChanged"
    assert stored["source"] == "herald/publish/billing"
    assert stored["data"] == {"sku": "a", "price": 3}
    assert stored["time"].endswith("Z") and len(stored["id"]) >= 16


async def test_a_batch_lands_in_order_keeping_given_ids_times_sources_and_extensions(publisher: Herald) -> None:
    batch = [
        {"type": "A", "id": "evt-1", "source": "https://billing.example/orders", "time": "2024-05-01T10:00:00Z",
         "subject": "orders/7", "tenant": "acme", "data": [1, 2]},
        {"type": "B", "data": "text"},
        {"specversion": "1.0", "type": "C", "data": None},
    ]
    response = await publisher.client.post("/topics/chats/room-1/events", headers=bearer(), json=batch)
    assert response.status_code == 200, response.text
    answers = response.json()["events"]
    stored = await history(publisher, "chats/room-1")
    assert [s["type"] for s in stored] == ["A", "B", "C"]
    assert [a["cursor"] for a in answers] == [s["_cursor"] for s in stored]
    assert [a["id"] for a in answers] == [s["id"] for s in stored]
    first = stored[0]
    assert (first["id"], first["source"], first["time"], first["subject"]) == (
        "evt-1", "https://billing.example/orders", "2024-05-01T10:00:00Z", "orders/7")
    assert first["tenant"] == "acme" and first["data"] == [1, 2]


async def test_cloudevents_content_types_are_json_too(publisher: Herald) -> None:
    for content_type, body in (("application/cloudevents+json", {"type": "One"}),
                               ("application/cloudevents-batch+json", [{"type": "Two"}])):
        response = await publisher.client.post("/topics/chats/ce/events", content=orjson.dumps(body),
                                               headers={**bearer(), "Content-Type": content_type})
        assert response.status_code == 200, response.text
    assert [s["type"] for s in await history(publisher, "chats/ce")] == ["One", "Two"]


async def test_a_published_event_reaches_a_subscriber_of_the_topic_like_a_workers(publisher: Herald) -> None:
    from herald.hub import Subscriber

    sub = Subscriber(max_queue=16, transport="sse")
    await publisher.gateway.hub.follow(sub, "chats/live", None, from_start=False)
    try:
        response = await publisher.client.post("/topics/chats/live/events", headers=bearer(),
                                               json=[{"type": "X", "data": 1}, {"type": "Y", "data": 2}])
        assert response.status_code == 200
        frames = []
        while len(frames) < 2:
            frames.extend(await sub.next_batch())
        assert [(f.type, f.cursor) for f in frames] == [("X", response.json()["events"][0]["cursor"]),
                                                        ("Y", response.json()["events"][1]["cursor"])]
    finally:
        await publisher.gateway.hub.leave(sub)


# Who may publish ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "topic", "allowed"), [
    ("chats/*", "chats/lobby", True),
    ("chats/*", "chats", False),
    ("chats/*", "chats/a/b", False),
    ("chats/{room}", "chats/lobby", True),
    ("chats/{room}", "chats/a/b", False),
    ("chats/**", "chats/a", True),
    ("chats/**", "chats/a/b/c", True),
    ("chats/**", "chats", False),
    ("orders/{id}/items/*", "orders/7/items/3", True),
    ("orders/{id}/items/*", "orders/7/lines/3", False),
    ("orders/42", "orders/42", True),
    ("orders/42", "orders/420", False),
    ("orders/4.2", "orders/4x2", False),  # a literal dot, not a regex one
    ("*", "news", True),
    ("*", "news/1", False),
    ("**", "a/b/c", True),
])
def test_claim_patterns_match_whole_segments(pattern: str, topic: str, allowed: bool) -> None:
    assert allows([pattern], topic) is allowed


@pytest.mark.parametrize("pattern", ["", "chats/**/x", "chats/a*", "chats/{room", "chats//x", "chats/ x", "a/" * 9])
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_pattern(pattern)


def test_the_claim_may_be_nested_or_flat_but_not_both() -> None:
    assert publish_patterns({"herald": {"publish": ["a/*"]}}) == ["a/*"]
    assert publish_patterns({"herald.publish": ["b/*"]}) == ["b/*"]
    assert publish_patterns({"sub": "x"}) is None
    with pytest.raises(PatternError):
        publish_patterns({"herald": {"publish": ["a/*"]}, "herald.publish": ["b/*"]})
    with pytest.raises(PatternError):
        publish_patterns({"herald": {"publish": "a/*"}})


async def test_a_token_for_orders_cannot_publish_to_a_chat_room(publisher: Herald) -> None:
    headers = bearer(["orders/*"])
    doc = assert_problem(await publisher.client.post("/topics/chats/x/events", headers=headers, json={"type": "X"}),
                         403, "publish-forbidden")
    assert "chats/x" in doc["detail"]
    ok = await publisher.client.post("/topics/orders/42/events", headers=headers, json={"type": "X"})
    assert ok.status_code == 200, ok.text
    assert await history(publisher, "chats/x") == []


async def test_a_token_without_the_claim_or_with_a_broken_one_is_forbidden(publisher: Herald) -> None:
    for headers in (bearer(None), bearer(["chats/a*"])):
        response = await publisher.client.post("/topics/chats/x/events", headers=headers, json={"type": "X"})
        assert_problem(response, 403, "publish-forbidden")
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


async def test_no_token_a_forged_one_or_an_expired_one_is_unauthorized(publisher: Herald) -> None:
    cases = [({}, 'Bearer realm="herald"'),
             (bearer(key="not-the-publisher-key-0123456789abcdef"), 'error="invalid_token"'),
             (bearer(ttl=-120), 'error="invalid_token"'),
             ({"Authorization": "Basic YTpi"}, 'error="invalid_token"')]
    for headers, challenge in cases:
        response = await publisher.client.post("/topics/chats/x/events", headers=headers, json={"type": "X"})
        assert_problem(response, 401, "unauthorized")
        assert challenge in response.headers["www-authenticate"]
    assert await history(publisher, "chats/x") == []


async def test_publishing_is_never_anonymous_and_says_which_setting_opens_it(herald: Herald) -> None:
    response = await herald.client.post("/topics/chats/x/events", headers=bearer(), json={"type": "X"})
    doc = assert_problem(response, 401, "unauthorized")
    assert "HERALD_PUBLISH_JWT_SECRET" in doc["detail"]


async def test_operation_topics_are_refused_whatever_the_claim(publisher: Herald) -> None:
    response = await publisher.client.post("/topics/operations/op_abc/events", headers=bearer(["**"]),
                                           json={"type": "herald.operation.succeeded"})
    assert_problem(response, 403, "reserved-topic")


async def test_a_bad_topic_name_is_a_400(publisher: Herald) -> None:
    response = await publisher.client.post("/topics/chats/a%20b/events", headers=bearer(["**"]), json={"type": "X"})
    assert_problem(response, 400, "bad-topic")
    response = await publisher.client.post("/topics/a/b/c/d/e/events", headers=bearer(["**"]), json={"type": "X"})
    assert_problem(response, 400, "bad-topic")


async def test_with_bearer_auth_on_the_publisher_key_still_opens_publishing_and_user_tokens_do_not(
    make_herald: MakeHerald,
) -> None:
    herald = await make_herald(jwt_secret=USER_KEY, publish_jwt_secret=PUBLISH_KEY, embedded_worker=False)
    ok = await herald.client.post("/topics/chats/x/events", headers=bearer(), json={"type": "X"})
    assert ok.status_code == 200, ok.text
    user = await herald.client.post("/topics/chats/x/events", headers=bearer(key=USER_KEY), json={"type": "X"})
    assert_problem(user, 401, "unauthorized")


async def test_without_a_publisher_key_the_bearer_key_signs_publisher_tokens(make_herald: MakeHerald) -> None:
    herald = await make_herald(jwt_secret=USER_KEY, embedded_worker=False)
    ok = await herald.client.post("/topics/chats/x/events", headers=bearer(key=USER_KEY), json={"type": "X"})
    assert ok.status_code == 200, ok.text
    plain_user = await herald.client.post("/topics/chats/x/events", headers=bearer(None, key=USER_KEY),
                                          json={"type": "X"})
    assert_problem(plain_user, 403, "publish-forbidden")


async def test_a_publisher_token_is_verified_once_until_its_exp(
    publisher: Herald, monkeypatch: pytest.MonkeyPatch,
) -> None:
    [route] = [r for r in publisher.app.routes if getattr(r, "name", None) == "publish"]
    auth = route.endpoint.__self__  # type: ignore[attr-defined]  # the PublishAuth serving the route
    verified: list[str] = []
    real = auth.verifier.claims
    monkeypatch.setattr(auth.verifier, "claims", lambda token: verified.append(token) or real(token))
    headers = bearer(ttl=60)
    for _ in range(3):
        assert (await publisher.client.post("/topics/chats/v/events", headers=headers, json={"type": "A"})).is_success
    assert len(verified) == 1
    refused = await publisher.client.post("/topics/chats/other/events", headers=bearer(["orders/*"]),
                                          json={"type": "A"})
    assert refused.status_code == 403 and len(verified) == 2
    later = time.time() + 61  # past the token's exp: verified again (and refused once past PyJWT's leeway too)
    monkeypatch.setattr("herald.http.publish.time.time", lambda: later)
    assert (await publisher.client.post("/topics/chats/v/events", headers=headers, json={"type": "A"})).is_success
    assert len(verified) == 3


def test_a_short_publisher_secret_is_refused_at_startup() -> None:
    with pytest.raises(SettingsError, match="HERALD_PUBLISH_JWT_SECRET"):
        Settings.from_env({"HERALD_PUBLISH_JWT_SECRET": "short"})


# Bad bodies and limits ---------------------------------------------------------------------------

async def test_bad_bodies_get_problems_naming_the_event(publisher: Herald) -> None:
    post = publisher.client.post
    url = "/topics/chats/bad/events"
    assert_problem(await post(url, headers=bearer(), content=b"type=X"), 415, "unsupported-media-type")
    assert_problem(await post(url, headers={**bearer(), "Content-Type": "application/json"}, content=b"{nope"),
                   400, "invalid-json")
    doc = assert_problem(await post(url, headers=bearer(), json=[{"type": "A"}, {"data": 1}]), 422, "invalid-event")
    assert doc["index"] == 1 and "'type'" in doc["detail"]
    doc = assert_problem(await post(url, headers=bearer(), json=[{"type": "A"}, 7]), 422, "invalid-event")
    assert doc["index"] == 1
    doc = assert_problem(await post(url, headers=bearer(), json={"type": "A", "Bad_Name": 1}), 422, "invalid-event")
    assert doc["index"] == 0
    doc = assert_problem(await post(url, headers=bearer(), json={"type": "A", "specversion": "0.3"}), 422)
    assert doc["index"] == 0
    assert_problem(await post(url, headers=bearer(), json=[]), 422, "empty-batch")
    assert await history(publisher, "chats/bad") == []  # a batch with one bad event stores none of them


async def test_batch_body_and_event_size_limits(make_herald: MakeHerald) -> None:
    herald = await make_herald(publish_jwt_secret=PUBLISH_KEY, embedded_worker=False, publish_max_batch=3,
                               publish_max_body=4096, publish_max_event=512)
    post = herald.client.post
    url = "/topics/chats/limits/events"
    doc = assert_problem(await post(url, headers=bearer(), json=[{"type": "A"}] * 4), 422, "batch-too-large")
    assert doc["max_batch"] == 3
    assert_problem(await post(url, headers=bearer(), json=[{"type": "A", "data": "x" * 1000}] * 5),
                   413, "body-too-large")
    doc = assert_problem(await post(url, headers=bearer(), json=[{"type": "A"}, {"type": "B", "data": "y" * 600}]),
                         422, "event-too-large")
    assert doc["index"] == 1 and doc["max_event"] == 512
    assert (await post(url, headers=bearer(), json=[{"type": "A", "data": "z" * 300}] * 3)).status_code == 200


async def test_the_rate_counts_events_per_publisher_and_answers_429_with_retry_after(
    make_herald: MakeHerald,
) -> None:
    herald = await make_herald(publish_jwt_secret=PUBLISH_KEY, embedded_worker=False, publish_rate=5)
    post = herald.client.post
    url = "/topics/chats/rate/events"
    doc = assert_problem(await post(url, headers=bearer(), json=[{"type": "A"}] * 6), 422, "batch-too-large")
    assert doc["max_batch"] == 5
    # both in one one-second window unless the clock ticks over between them: then try once more
    for _ in range(2):
        first = await post(url, headers=bearer(sub="a"), json=[{"type": "A"}] * 3)
        second = await post(url, headers=bearer(sub="a"), json=[{"type": "A"}] * 3)
        if second.status_code == 429:
            break
    assert first.status_code == 200
    assert_problem(second, 429, "publish-rate-limited")
    assert second.headers["retry-after"] == "1"
    other = await post(url, headers=bearer(sub="b"), json=[{"type": "A"}] * 3)
    assert other.status_code == 200  # another publisher has a budget of its own
    metrics = (await herald.client.get("/metrics")).text
    assert 'herald_limited_total{reason="publish-rate"} ' in metrics
    assert 'herald_limited_total{reason="publish-rate"} 0.0' not in metrics


# Idempotency -------------------------------------------------------------------------------------

async def test_a_retried_batch_with_the_same_idempotency_key_lands_once(publisher: Herald) -> None:
    batch = [{"type": "A", "data": 1}, {"type": "B", "data": 2}]
    headers = {**bearer(), "Idempotency-Key": "batch-0001"}
    first = await publisher.client.post("/topics/chats/idem/events", headers=headers, json=batch)
    again = await publisher.client.post("/topics/chats/idem/events", headers=headers, json=batch)
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    stored = await history(publisher, "chats/idem")
    assert [s["_cursor"] for s in stored] == [e["cursor"] for e in first.json()["events"]]


async def test_the_same_key_with_another_body_or_topic_is_a_422(publisher: Herald) -> None:
    headers = {**bearer(["chats/*"]), "Idempotency-Key": "k"}
    assert (await publisher.client.post("/topics/chats/a/events", headers=headers, json={"type": "A"})).status_code \
        == 200
    assert_problem(await publisher.client.post("/topics/chats/a/events", headers=headers, json={"type": "B"}),
                   422, "idempotency-key-reused")
    assert_problem(await publisher.client.post("/topics/chats/b/events", headers=headers, json={"type": "A"}),
                   422, "idempotency-key-reused")
    assert len(await history(publisher, "chats/a")) == 1
    assert await history(publisher, "chats/b") == []


async def test_idempotency_keys_are_scoped_per_publisher(publisher: Herald) -> None:
    # "urn:a" with key "1:k" and "urn:a:1" with key "k" must not share a scope
    for sub, key in (("urn:a", "1:k"), ("urn:a:1", "k")):
        response = await publisher.client.post("/topics/chats/scoped/events", json={"type": "A"},
                                               headers={**bearer(sub=sub), "Idempotency-Key": key})
        assert response.status_code == 200 and "idempotent-replayed" not in response.headers
    assert len(await history(publisher, "chats/scoped")) == 2


async def test_a_malformed_idempotency_key_is_a_400(publisher: Herald) -> None:
    response = await publisher.client.post("/topics/chats/k/events", json={"type": "A"},
                                           headers={**bearer(), "Idempotency-Key": "x" * 300})
    assert_problem(response, 400, "bad-idempotency-key")


# Documents ---------------------------------------------------------------------------------------

async def test_openapi_documents_the_publish_operation(publisher: Herald) -> None:
    doc = (await publisher.client.get("/openapi.json")).json()
    post = doc["paths"]["/topics/{topic}/events"]["post"]
    assert post["operationId"] == "publish_events"
    assert {"200", "401", "403", "413", "415", "422", "429"} <= set(post["responses"])
    assert "get" in doc["paths"]["/topics/{topic}/events"]
