"""The Mercure hub over real HTTP: publish, subscribe, private updates, resume, errors, CORS, keys.

Each test serves the app with uvicorn (``make_live``) on the memory broker; the ones marked so
also on Redis. The bytes a subscriber gets are checked exactly: they are the protocol.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from herald.app import create_app
from herald.http.mercure import MercureHub, MercureKey
from herald.mercure import FIREHOSE, MercureError
from herald.settings import SettingsError
from tests.herald.http.harness import LiveHerald, assert_problem, make_settings, wait_until
from tests.support.sse import SSEStream, sse_connect

HUB = "/.well-known/mercure"
PUBLISHER_KEY = "publisher-key-0123456789abcdef-0123456789"
SUBSCRIBER_KEY = "subscriber-key-0123456789abcdef-012345678"
BOOK = "https://example.com/books/1"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

MakeLive = Callable[..., Awaitable[LiveHerald]]


def token(key: str = PUBLISHER_KEY, algorithm: str = "HS256", **mercure: Any) -> str:
    """A Mercure JWT with ``mercure`` as its claim (``exp=`` goes to the top level)."""
    claims: dict[str, Any] = {"mercure": {k: v for k, v in mercure.items() if k != "exp"}}
    if "exp" in mercure:
        claims["exp"] = mercure["exp"]
    return jwt.encode(claims, key, algorithm=algorithm)


PUBLISHER = {"Authorization": f"Bearer {token(publish=['*'])}"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` (the memory broker) or the URL of the test session's Redis."""
    return None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


async def hub(make_live: MakeLive, **overrides: Any) -> LiveHerald:
    """An app with a Mercure hub: a publisher key, a subscriber key of its own, anonymous subscribers allowed."""
    options: dict[str, Any] = {"mercure_publisher_jwt_key": PUBLISHER_KEY,
                               "mercure_subscriber_jwt_key": SUBSCRIBER_KEY, "mercure_anonymous": True,
                               "heartbeat": 5.0, **overrides}
    return await make_live(**options)


async def publish(live: LiveHerald, topics: str | list[str], data: str = "", **fields: str) -> str:
    """Publish one update as a form; its id (asserting the 200 text/plain answer)."""
    form: list[tuple[str, str]] = [("topic", t) for t in ([topics] if isinstance(topics, str) else topics)]
    form += [("data", data), *fields.items()]
    response = await live.client.post(HUB, content=urlencode(form), headers={**PUBLISHER, **FORM})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    return response.text


def subscribe(live: LiveHerald, *topics: str, headers: dict[str, str] | None = None,
              **params: str) -> Any:
    return sse_connect(live.client, HUB, params=[*(("topic", t) for t in topics), *params.items()],
                       headers=headers)


async def messages(stream: SSEStream, count: int) -> list[tuple[str | None, str | None]]:
    """The next ``count`` messages as ``(id, data)``."""
    return [(b.id, b.data) for b in await stream.messages(count)]


async def quiet(stream: SSEStream, seconds: float = 0.3) -> None:
    """Assert no message arrives for ``seconds``."""
    with pytest.raises(TimeoutError):
        block = await stream.next_message(seconds)
        pytest.fail(f"unexpected message {block}")


# Publish and subscribe -------------------------------------------------------------------------

async def test_a_subscriber_gets_each_update_as_the_reference_hub_frames_it(make_live: MakeLive,
                                                                           broker_url: str | None) -> None:
    live = await hub(make_live, redis_url=broker_url)
    async with subscribe(live, BOOK) as stream:
        assert stream.response.status_code == 200
        headers = stream.response.headers
        assert headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "private, no-cache, no-store, must-revalidate, max-age=0"
        assert headers["x-accel-buffering"] == "no"
        assert headers["last-event-id"] == "earliest"  # nothing was ever published
        given = await publish(live, BOOK, '{"@id": "/books/1"}\n{"second": "line"}', id="urn:uuid:given",
                              type="book.updated", retry="1500")
        generated = await publish(live, BOOK, "plain")
        await stream.messages(2)
    assert given == "urn:uuid:given" and generated.startswith("urn:uuid:") and len(generated) == 45
    assert stream.raw == (b":\n"
                          b"event: book.updated\nretry: 1500\nid: urn:uuid:given\n"
                          b'data: {"@id": "/books/1"}\ndata: {"second": "line"}\n\n'
                          + f"id: {generated}\ndata: plain\n\n".encode())


async def test_exact_topics_templates_star_and_alternates_each_deliver_an_update_once(make_live: MakeLive) -> None:
    live = await hub(make_live)
    async with (subscribe(live, BOOK, "https://example.com/authors/{id}", "https://example.com/feeds/alt") as mixed,
                subscribe(live, "*") as everything):
        expected = [
            await publish(live, BOOK, "exact"),
            await publish(live, "https://example.com/authors/7", "template"),
            await publish(live, ["https://example.com/other/9", "https://example.com/feeds/alt"], "alternate"),
            # selected three ways at once: still one message
            await publish(live, [BOOK, "https://example.com/authors/3", "https://example.com/feeds/alt"], "thrice"),
        ]
        await publish(live, "https://example.com/books/2", "other book")
        await publish(live, "https://example.com/authors/7/books", "not an expansion")
        last = await publish(live, BOOK, "last")
        got = await messages(mixed, 5)
        assert [i for i, _ in got] == [*expected, last]
        assert [d for _, d in got] == ["exact", "template", "alternate", "thrice", "last"]
        assert [d for _, d in await messages(everything, 7)] == [
            "exact", "template", "alternate", "thrice", "other book", "not an expansion", "last"]


async def test_a_symfony_publisher_request_is_published_as_sent(make_live: MakeLive) -> None:
    # byte for byte what symfony/mercure's Hub::publish() sends (HttpClient, QueryBuilder, urlencode)
    jwt_token = token(publish=["*"], subscribe=[])
    body = (b"topic=https%3A%2F%2Fexample.com%2Fbooks%2F1&topic=https%3A%2F%2Fexample.com%2Fusers%2Fdunglas%2F%3F"
            b"topic%3Dhttps%253A%252F%252Fexample.com%252Fbooks%252F1&data=%7B%22%40id%22%3A%22%2Fbooks%2F1%22%2C"
            b"%22title%22%3A%22Les+Mis%C3%A9rables%22%7D&private=on&id=urn%3Auuid%3A4b1f3c52&type=book.updated"
            b"&retry=1000")
    live = await hub(make_live, mercure_subscriber_jwt_key=None)  # one key for both, as Symfony's bundle has
    cookie = token(subscribe=["https://example.com/users/dunglas/{?topic}"])
    async with subscribe(live, "https://example.com/books/{id}", headers={"Cookie": f"mercureAuthorization={cookie}"}
                         ) as stream:
        request = (b"POST /.well-known/mercure HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n"
                   b"Authorization: Bearer " + jwt_token.encode() + b"\r\n"
                   b"Content-Type: application/x-www-form-urlencoded\r\nUser-Agent: Symfony HttpClient/Curl\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = await asyncio.to_thread(_raw_request, live.port, request)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert b"content-type: text/plain; charset=utf-8\r\n" in answer
        assert answer.endswith(b"\r\n\r\nurn:uuid:4b1f3c52")
        block = await stream.next_message()
    assert (block.event, block.retry, block.id, block.data) == (
        "book.updated", 1000, "urn:uuid:4b1f3c52", '{"@id":"/books/1","title":"Les Misérables"}')


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"urn:uuid:4b1f3c52"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


# Private updates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cookie", "header", "query"])
async def test_private_updates_reach_only_subscribers_whose_claim_matches_a_topic(make_live: MakeLive,
                                                                                 how: str) -> None:
    live = await hub(make_live)
    ann = token(SUBSCRIBER_KEY, subscribe=["https://example.com/users/ann/{?topic}"])
    by_how: dict[str, dict[str, Any]] = {
        "cookie": {"headers": {"Cookie": f"mercureAuthorization={ann}"}},
        "header": {"headers": {"Authorization": f"Bearer {ann}"}},
        "query": {"authorization": ann},
    }
    credentials = by_how[how]
    alternate = "https://example.com/users/ann/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1"
    async with (subscribe(live, "https://example.com/books/{id}", **credentials) as authorised,
                subscribe(live, "https://example.com/books/{id}") as anonymous):
        await publish(live, [BOOK, alternate], "for ann", private="on")
        await publish(live, "https://example.com/books/2", "for nobody", private="")
        await publish(live, BOOK, "for everyone")
        assert [d for _, d in await messages(authorised, 2)] == ["for ann", "for everyone"]
        assert [d for _, d in await messages(anonymous, 1)] == ["for everyone"]


async def test_the_subscriber_key_is_not_the_publisher_key(make_live: MakeLive) -> None:
    live = await hub(make_live)
    signed_by_publisher_key = token(PUBLISHER_KEY, subscribe=["*"])
    async with subscribe(live, BOOK, authorization=signed_by_publisher_key) as stream:
        assert_problem(await _read(stream), 401, "invalid-token")
    response = await live.client.post(HUB, data={"topic": BOOK},
                                      headers={"Authorization": f"Bearer {token(SUBSCRIBER_KEY, publish=['*'])}"})
    assert_problem(response, 401, "invalid-token")


async def _read(stream: SSEStream) -> httpx.Response:
    await stream.response.aread()
    return stream.response


async def test_a_subscription_ends_when_its_token_expires(make_live: MakeLive) -> None:
    live = await hub(make_live)
    expiring = token(SUBSCRIBER_KEY, subscribe=["*"], exp=int(time.time()) + 2)
    async with subscribe(live, BOOK, authorization=expiring) as stream:
        assert stream.response.status_code == 200
        await stream.until_end(timeout=5)


# Resume ----------------------------------------------------------------------------------------

async def test_resume_replays_what_followed_the_last_event_id_in_order(make_live: MakeLive,
                                                                      broker_url: str | None) -> None:
    live = await hub(make_live, redis_url=broker_url)
    ids = [await publish(live, BOOK if n % 2 == 0 else "https://example.com/books/2", f"u{n}") for n in range(6)]
    async with subscribe(live, BOOK, headers={"Last-Event-ID": ids[1]}) as stream:
        assert stream.response.headers["last-event-id"] == ids[1]
        assert await messages(stream, 2) == [(ids[2], "u2"), (ids[4], "u4")]
        live_id = await publish(live, BOOK, "live")
        assert await messages(stream, 1) == [(live_id, "live")]
    # the query parameter works the same; the header wins when both are there
    async with subscribe(live, "*", lastEventID=ids[3], headers={"Last-Event-ID": ids[4]}) as stream:
        assert stream.response.headers["last-event-id"] == ids[4]
        assert await messages(stream, 2) == [(ids[5], "u5"), (live_id, "live")]
    async with subscribe(live, "*", lastEventID=ids[3]) as stream:
        assert await messages(stream, 3) == [(ids[4], "u4"), (ids[5], "u5"), (live_id, "live")]


async def test_resume_finds_an_id_this_process_never_saw_in_the_history(make_live: MakeLive) -> None:
    live = await hub(make_live)
    ids = [await publish(live, BOOK, f"u{n}") for n in range(3)]  # no subscriber yet: no index of ids
    assert _hub(live).router.cursors == {}
    async with subscribe(live, BOOK, lastEventID=ids[0]) as stream:
        assert stream.response.headers["last-event-id"] == ids[0]
        assert await messages(stream, 2) == [(ids[1], "u1"), (ids[2], "u2")]


async def test_earliest_replays_the_whole_history_kept(make_live: MakeLive) -> None:
    live = await hub(make_live)
    ids = [await publish(live, BOOK, f"u{n}") for n in range(3)]
    async with subscribe(live, BOOK, lastEventID="earliest") as stream:
        assert stream.response.headers["last-event-id"] == "earliest"
        assert await messages(stream, 3) == [(ids[0], "u0"), (ids[1], "u1"), (ids[2], "u2")]


async def test_an_unknown_or_expired_id_starts_live_and_the_header_names_the_newest_update(
        make_live: MakeLive) -> None:
    live = await hub(make_live, history_size=3)
    ids = [await publish(live, BOOK, f"u{n}") for n in range(5)]  # u0 and u1 are no longer kept
    for requested in ("urn:uuid:never-published", ids[0]):
        async with subscribe(live, BOOK, lastEventID=requested) as stream:
            # not the id asked for, but the newest: the client can tell that it missed updates
            assert stream.response.headers["last-event-id"] == ids[-1]
            fresh = await publish(live, BOOK, "after")
            assert await messages(stream, 1) == [(fresh, "after")]
            ids.append(fresh)
    async with subscribe(live, BOOK, lastEventID=ids[5]) as stream:  # still kept
        assert await messages(stream, 1) == [(ids[6], "after")]


async def test_without_an_id_the_header_names_the_newest_update_at_connect_time(make_live: MakeLive) -> None:
    live = await hub(make_live)
    await publish(live, BOOK, "old")
    newest = await publish(live, "https://example.com/elsewhere", "newest")
    async with subscribe(live, BOOK) as stream:
        assert stream.response.headers["last-event-id"] == newest
        await quiet(stream, 0.2)  # nothing replayed


async def test_updates_lost_beyond_the_history_end_every_stream_for_its_client_to_resume(make_live: MakeLive) -> None:
    live = await hub(make_live)
    async with subscribe(live, BOOK) as stream:
        first = await publish(live, BOOK, "before")
        assert await messages(stream, 1) == [(first, "before")]
        live.gateway.hub.gap(FIREHOSE, None)  # as the broker reports a fan-out that lost more than the history holds
        assert await stream.until_end() == []


# Errors ----------------------------------------------------------------------------------------

async def test_publish_errors(make_live: MakeLive) -> None:
    live = await hub(make_live, publish_max_body=1024)
    post = live.client.post

    def bearer(value: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {value}"}

    unauthorized = await post(HUB, data={"topic": BOOK})
    assert_problem(unauthorized, 401, "unauthorized")
    assert unauthorized.headers["www-authenticate"] == 'Bearer realm="mercure"'
    assert_problem(await post(HUB, data={"topic": BOOK}, headers=bearer("not.a.jwt")), 401, "invalid-token")
    assert_problem(await post(HUB, data={"topic": BOOK}, headers=bearer(token("another-key-0123456789abcdef-0123456",
                                                                               publish=["*"]))), 401, "invalid-token")
    assert_problem(await post(HUB, data={"topic": BOOK}, headers=bearer(token(publish=["*"], exp=1))), 401,
                   "invalid-token")
    assert_problem(await post(HUB, data={"topic": BOOK}, headers=bearer(token(subscribe=["*"]))), 401,
                   "unauthorized")  # no mercure.publish claim
    assert_problem(await post(HUB, data={"topic": BOOK}, headers={"Authorization": "Basic eDp5"}), 401)
    books_only = bearer(token(publish=["https://example.com/books/{id}"]))
    assert_problem(await post(HUB, data={"topic": "https://example.com/users/1"}, headers=books_only), 403,
                   "forbidden-topic")
    assert_problem(await post(HUB, data={"topic": [BOOK, "https://example.com/users/1"]}, headers=books_only),
                   403, "forbidden-topic")  # every topic must be allowed, alternates too
    assert_problem(await post(HUB, data={"data": "no topic"}, headers=PUBLISHER), 400, "missing-topic")
    assert_problem(await post(HUB, data={"topic": BOOK, "retry": "soon"}, headers=PUBLISHER), 400, "bad-retry")
    assert_problem(await post(HUB, data={"topic": BOOK, "id": "#1"}, headers=PUBLISHER), 400, "bad-id")
    assert_problem(await post(HUB, json={"topic": BOOK}, headers=PUBLISHER), 415, "unsupported-media-type")
    assert_problem(await post(HUB, data={"topic": BOOK, "data": "x" * 2000}, headers=PUBLISHER), 413,
                   "body-too-large")
    assert_problem(await live.client.put(HUB, data={"topic": BOOK}, headers=PUBLISHER), 405)
    # the query parameter carries a publisher's token too
    assert (await post(HUB, data={"topic": BOOK}, params={"authorization": token(publish=["*"])})).status_code == 200
    # books_only may publish a book, to its canonical and alternate topics alike
    ok = await post(HUB, data={"topic": [BOOK, "https://example.com/books/1.jsonld"]}, headers=books_only)
    assert ok.status_code == 200, ok.text


async def test_without_a_publisher_key_publishing_is_off_and_says_which_setting_to_set(make_live: MakeLive) -> None:
    live = await make_live(mercure_anonymous=True)
    problem = assert_problem(await live.client.post(HUB, data={"topic": BOOK}, headers=PUBLISHER), 401,
                             "unauthorized")
    assert "HERALD_MERCURE_PUBLISHER_JWT_KEY" in problem["detail"]
    async with subscribe(live, BOOK, authorization=token(subscribe=["*"])) as stream:
        problem = (await _read(stream)).json()
        assert stream.response.status_code == 401 and "HERALD_MERCURE_SUBSCRIBER_JWT_KEY" in problem["detail"]
    async with subscribe(live, BOOK) as stream:  # anonymous subscribers are still served
        assert stream.response.status_code == 200


async def test_subscribe_errors(make_live: MakeLive) -> None:
    live = await hub(make_live, mercure_anonymous=False, max_topics_per_connection=2)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({}, 400, "missing-topic"),
        ({"topic": ["a", "b", "c"]}, 400, "too-many-topics"),
        ({"topic": "a\nb"}, 400, "bad-topic"),
        ({"topic": BOOK}, 401, "unauthorized"),  # no token, and no anonymous subscribers
        ({"topic": BOOK, "authorization": "garbage"}, 401, "invalid-token"),
    ]
    for params, status, kind in cases:
        response = await live.client.get(HUB, params=params)
        assert_problem(response, status, kind)
    expired = token(SUBSCRIBER_KEY, subscribe=["*"], exp=int(time.time()) - 5)
    assert_problem(await live.client.get(HUB, params={"topic": BOOK, "authorization": expired}), 401,
                   "invalid-token")
    async with subscribe(live, BOOK, authorization=token(SUBSCRIBER_KEY)) as stream:  # a token without claims
        assert stream.response.status_code == 200


def test_keys_and_origins_the_hub_cannot_use_stop_the_app_at_startup() -> None:
    with pytest.raises(SettingsError, match="HERALD_MERCURE_PUBLISHER_JWT_KEY must be at least 32 bytes"):
        create_app(make_settings(mercure_publisher_jwt_key="short"))
    with pytest.raises(SettingsError, match="HERALD_MERCURE_SUBSCRIBER_JWT_KEY is not a PEM public key"):
        create_app(make_settings(mercure_subscriber_jwt_key="-----BEGIN PUBLIC KEY-----\nnope\n"))
    with pytest.raises(SettingsError, match="allows none"):
        create_app(make_settings(mercure_publisher_jwt_key=PUBLISHER_KEY, mercure_jwt_algorithms=("RS256",)))
    with pytest.raises(SettingsError, match="HERALD_MERCURE_CORS_ORIGINS"):
        create_app(make_settings(mercure_cors_origins=("*",)))


def test_a_token_verified_once_is_checked_for_expiry_at_every_use(monkeypatch: pytest.MonkeyPatch) -> None:
    key = MercureKey(PUBLISHER_KEY, setting="HERALD_MERCURE_PUBLISHER_JWT_KEY")
    expires = int(time.time()) + 60
    reused = token(publish=["*"], exp=expires)
    assert key.claims(reused) is key.claims(reused)  # the signature is checked once
    monkeypatch.setattr(time, "time", lambda: expires)
    with pytest.raises(MercureError) as caught:
        key.claims(reused)
    assert (caught.value.status, caught.value.detail) == (401, "the token has expired")


async def test_an_rsa_publisher_key_verifies_rs256_tokens_only(make_live: MakeLive) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    live = await make_live(mercure_publisher_jwt_key=public)
    signed = jwt.encode({"mercure": {"publish": ["*"]}}, private, algorithm="RS256")
    response = await live.client.post(HUB, data={"topic": BOOK}, headers={"Authorization": f"Bearer {signed}"})
    assert response.status_code == 200, response.text
    # the public key's PEM used as an HMAC secret (algorithm confusion) is refused
    forged = jwt.encode({"mercure": {"publish": ["*"]}}, "x" * 40, algorithm="HS256")
    assert_problem(await live.client.post(HUB, data={"topic": BOOK}, headers={"Authorization": f"Bearer {forged}"}),
                   401, "invalid-token")


# Around the hub ----------------------------------------------------------------------------------

async def test_herald_bearer_authentication_leaves_the_hub_to_its_own_keys(make_live: MakeLive) -> None:
    live = await hub(make_live, jwt_secret="herald-bearer-secret-0123456789abcdef")
    async with subscribe(live, BOOK) as stream:
        assert stream.response.status_code == 200
        update = await publish(live, BOOK, "through")
        assert await messages(stream, 1) == [(update, "through")]


async def test_herald_topic_endpoints_cannot_reach_the_hubs_internal_topic(make_live: MakeLive) -> None:
    live = await hub(make_live)
    signer = live.gateway.signer
    response = await live.client.get(f"/topics/events?topic={FIREHOSE}&token={signer.issue([FIREHOSE])}")
    assert_problem(response, 400, "bad-topic")


async def test_cors_lets_the_listed_origins_subscribe_with_credentials(make_live: MakeLive) -> None:
    live = await hub(make_live, mercure_cors_origins=("https://app.example.com",),
                     cors_origins=("https://other.example.com",))
    preflight = await live.client.options(HUB, headers={"Origin": "https://app.example.com",
                                                        "Access-Control-Request-Method": "GET",
                                                        "Access-Control-Request-Headers": "last-event-id"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    async with subscribe(live, BOOK, headers={"Origin": "https://app.example.com"}) as stream:
        assert stream.response.headers["access-control-allow-origin"] == "https://app.example.com"
        assert stream.response.headers["access-control-allow-credentials"] == "true"
        assert "last-event-id" in stream.response.headers["access-control-expose-headers"].lower()
    async with subscribe(live, BOOK, headers={"Origin": "https://other.example.com"}) as stream:
        assert "access-control-allow-origin" not in stream.response.headers  # HERALD_CORS_ORIGINS is not the hub's


async def test_heartbeats_keep_an_idle_subscription_open(make_live: MakeLive) -> None:
    live = await hub(make_live, heartbeat=0.1)
    async with subscribe(live, BOOK) as stream:
        await asyncio.sleep(0.35)
        update = await publish(live, BOOK, "still here")
        assert await messages(stream, 1) == [(update, "still here")]
    assert stream.raw.startswith(b":\n:\n:\n")


async def test_subscriptions_that_end_leave_nothing_behind(make_live: MakeLive) -> None:
    live = await hub(make_live)
    router = _hub(live).router
    async with (subscribe(live, BOOK, "https://example.com/authors/{id}") as one, subscribe(live, "*") as two):
        assert one.response.status_code == two.response.status_code == 200
        assert router.subscriptions == 3
        assert live.gateway.hub.connections == 3  # the two, and the router that follows the hub's topic
        assert live.gateway.admission.connections == 2
    await wait_until(lambda: router.subscriptions == 0 and live.gateway.hub.connections == 1
                     and live.gateway.admission.connections == 0)


async def test_subscriptions_count_against_the_connection_caps_per_token_and_per_client(make_live: MakeLive) -> None:
    live = await hub(make_live, max_connections_per_token=1, max_connections_per_client=2)
    ann = token(SUBSCRIBER_KEY, subscribe=["*"])
    async with subscribe(live, BOOK, authorization=ann) as first:
        assert first.response.status_code == 200
        async with subscribe(live, BOOK, authorization=ann) as again:
            assert_problem(await _read(again), 429, "too-many-connections")
        async with subscribe(live, BOOK) as anonymous:
            assert anonymous.response.status_code == 200
            async with subscribe(live, BOOK) as third:  # a third connection from this address
                assert_problem(await _read(third), 429, "too-many-connections")


async def test_resources_advertise_the_hub_with_a_link_header(make_live: MakeLive) -> None:
    assert (await hub(make_live)).gateway.mercure_link() == '</.well-known/mercure>; rel="mercure"'
    public = await hub(make_live, public_url="https://herald.example.com")
    assert public.gateway.mercure_link() == '<https://herald.example.com/.well-known/mercure>; rel="mercure"'


def _hub(live: LiveHerald) -> MercureHub:
    middleware = next(m for m in live.app.user_middleware if "hub" in m.kwargs)
    found = middleware.kwargs["hub"]
    assert isinstance(found, MercureHub)
    return found
