"""A plain browser ``EventSource`` on Herald's Mercure hub while the test publishes with form posts.

Every test runs on one gateway (memory broker), and on two gateways sharing Redis: the test
publishes to one and the browser subscribes on the other. Nothing in the page is Herald's: it is
the ``EventSource`` any Mercure client uses, and the ``mercureAuthorization`` cookie.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from tests.support.server import HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(120)]

PUBLISHER_KEY = "mercure-publisher-key-0123456789abcdef"
SUBSCRIBER_KEY = "mercure-subscriber-key-0123456789abcdef"
ENV = {"HERALD_MERCURE_PUBLISHER_JWT_KEY": PUBLISHER_KEY, "HERALD_MERCURE_SUBSCRIBER_JWT_KEY": SUBSCRIBER_KEY,
       "HERALD_MERCURE_ANONYMOUS": "1", "HERALD_HEARTBEAT": "1"}
HUB = "/.well-known/mercure"

# The page's side: EventSources whose every event is logged, for the test to read.
LOGGER = """
window.logs = {};
window.listen = (name, url, type) => {
  const log = window.logs[name] = {messages: [], typed: [], timeline: []};
  const source = new EventSource(url);
  source.onopen = () => log.timeline.push(['open', performance.now()]);
  source.onerror = () => log.timeline.push(['error', performance.now(), source.readyState]);
  source.onmessage = (e) => log.messages.push([e.lastEventId, e.data]);
  if (type) source.addEventListener(type, (e) => log.typed.push([e.lastEventId, e.data]));
};
window.hubUrl = (params) => {
  const url = new URL('/.well-known/mercure', location.origin);
  for (const [name, value] of params) url.searchParams.append(name, value);
  return url.toString();
};
true;  // not the function above: evaluate() would call it
"""


@dataclass
class Hubs:
    """Where the test publishes, and where the browser subscribes (the same gateway, or another on Redis)."""

    publish: HeraldServer
    subscribe: HeraldServer


@pytest.fixture(params=["one gateway", pytest.param("two gateways on Redis", marks=pytest.mark.redis)])
def hubs(request: pytest.FixtureRequest) -> Iterator[Hubs]:
    if request.param == "one gateway":
        with HeraldServer(ENV) as server:
            yield Hubs(server, server)
        return
    env = {**ENV, "REDIS_URL": str(request.getfixturevalue("redis_url"))}
    with HeraldServer(env) as one, HeraldServer(env) as other:
        yield Hubs(one, other)


@pytest.fixture
def contexts(browser: Browser) -> Iterator[list[BrowserContext]]:
    made: list[BrowserContext] = []
    yield made
    for context in made:
        context.close()


def open_page(browser: Browser, contexts: list[BrowserContext], server: HeraldServer,
              cookie: str | None = None) -> Page:
    """A page on the gateway's origin, in a browser context of its own (with the hub's cookie, if given)."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    contexts.append(context)
    if cookie is not None:
        set_cookie(context, cookie)
    page = context.new_page()
    page.goto(server.url + "/healthz")
    page.evaluate(LOGGER)
    return page


def set_cookie(context: BrowserContext, value: str) -> None:
    context.add_cookies([{"name": "mercureAuthorization", "value": value, "domain": "127.0.0.1", "path": HUB,
                          "httpOnly": True, "sameSite": "Strict"}])


def listen(page: Page, name: str, params: list[tuple[str, str]], type: str | None = None) -> None:
    """Open an ``EventSource`` on the hub and wait until it is open (the subscription is in place then)."""
    pairs = [[field, value] for field, value in params]
    page.evaluate("([name, pairs, type]) => listen(name, hubUrl(pairs), type)", [name, pairs, type])
    page.wait_for_function("(name) => logs[name].timeline.some(([what]) => what === 'open')", arg=name)


def received(page: Page, name: str, count: int, key: str = "messages") -> list[list[str]]:
    """The first ``count`` messages the ``EventSource`` got, as ``[id, data]``, once it has them."""
    page.wait_for_function("([name, key, count]) => logs[name][key].length >= count", arg=[name, key, count])
    got: list[list[str]] = page.evaluate("([name, key]) => logs[name][key]", [name, key])
    return got


def token(key: str, **mercure: Any) -> str:
    claims: dict[str, Any] = {"mercure": {k: v for k, v in mercure.items() if k != "exp"}}
    if "exp" in mercure:
        claims["exp"] = mercure["exp"]
    return jwt.encode(claims, key, algorithm="HS256")


def publish(server: HeraldServer, topics: str | list[str], data: str, **fields: str) -> str:
    """A form post, as any Mercure publisher makes it; the update's id."""
    form = {"topic": topics, "data": data, **fields}
    response = httpx.post(server.url + HUB, data=form, timeout=10,
                          headers={"Authorization": f"Bearer {token(PUBLISHER_KEY, publish=['*'])}"})
    assert response.status_code == 200, response.text
    return response.text


def curl_publish(server: HeraldServer, topic: str, data: str) -> str:
    """The same with curl: ``--data-urlencode`` fields make the form."""
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--max-time", "10", server.url + HUB,
         "-H", f"Authorization: Bearer {token(PUBLISHER_KEY, publish=['*'])}",
         "--data-urlencode", f"topic={topic}", "--data-urlencode", f"data={data}"],
        capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stderr
    return done.stdout


def unique(prefix: str) -> str:
    return f"https://example.com/{prefix}-{uuid.uuid4().hex[:8]}"


def test_exact_topics_templates_and_alternates_reach_one_eventsource(hubs: Hubs, browser: Browser,
                                                                      contexts: list[BrowserContext]) -> None:
    books, authors, feed = unique("books"), unique("authors"), unique("feed")
    page = open_page(browser, contexts, hubs.subscribe)
    listen(page, "mixed", [("topic", f"{books}/1"), ("topic", authors + "/{id}"), ("topic", feed)])
    expected = [
        [publish(hubs.publish, f"{books}/1", "exact"), "exact"],
        [curl_publish(hubs.publish, f"{authors}/7", "template, with curl"), "template, with curl"],
        [publish(hubs.publish, [unique("elsewhere"), feed], "alternate"), "alternate"],
        [publish(hubs.publish, [f"{books}/1", f"{authors}/3", feed], "selected three ways,\nsent once"),
         "selected three ways,\nsent once"],
    ]
    publish(hubs.publish, f"{books}/2", "another book")
    publish(hubs.publish, f"{authors}/7/books", "no expansion of the template")
    expected.append([publish(hubs.publish, f"{books}/1", "last"), "last"])
    assert received(page, "mixed", 5) == expected
    time.sleep(0.3)
    assert len(received(page, "mixed", 5)) == 5


def test_private_updates_reach_the_authorised_cookie_subscriber_and_not_an_anonymous_one(
        hubs: Hubs, browser: Browser, contexts: list[BrowserContext]) -> None:
    books = unique("books")
    # the draft's scheme: ann may read updates that carry her alternate topic
    ann_cookie = token(SUBSCRIBER_KEY, subscribe=["https://example.com/users/ann/{?topic}"])
    ann = open_page(browser, contexts, hubs.subscribe, cookie=ann_cookie)
    anonymous = open_page(browser, contexts, hubs.subscribe)
    for page in (ann, anonymous):
        listen(page, "books", [("topic", books + "/{id}")])
    alternate = "https://example.com/users/ann/?topic=" + quote(f"{books}/1", safe="")
    mine = publish(hubs.publish, [f"{books}/1", alternate], "for ann", private="on")
    publish(hubs.publish, f"{books}/2", "for nobody", private="on")
    public = publish(hubs.publish, f"{books}/3", "for everyone")
    assert received(ann, "books", 2) == [[mine, "for ann"], [public, "for everyone"]]
    assert received(anonymous, "books", 1) == [[public, "for everyone"]]
    time.sleep(0.3)
    assert len(received(ann, "books", 2)) == 2 and len(received(anonymous, "books", 1)) == 1


def test_type_retry_and_the_eventsources_own_resume_after_the_hub_ends_the_stream(
        hubs: Hubs, browser: Browser, contexts: list[BrowserContext]) -> None:
    topic = unique("books")
    # a token that expires in 6 s: the hub ends the subscription then (the draft says it must); long
    # enough that a loaded machine opens the page and delivers the first two updates before it
    page = open_page(browser, contexts, hubs.subscribe,
                     cookie=token(SUBSCRIBER_KEY, subscribe=["*"], exp=int(time.time()) + 6))
    listen(page, "typed", [("topic", topic)], type="book.updated")
    first = publish(hubs.publish, topic, "typed", type="book.updated", retry="1500")
    plain = publish(hubs.publish, topic, "plain")
    assert received(page, "typed", 1, "typed") == [[first, "typed"]]  # only to addEventListener('book.updated')
    assert received(page, "typed", 1) == [[plain, "plain"]]
    page.wait_for_function("logs.typed.timeline.some(([what]) => what === 'error')", timeout=15_000)
    # the stream ended; the EventSource comes back after `retry` ms, with Last-Event-ID: <plain>
    set_cookie(page.context, token(SUBSCRIBER_KEY, subscribe=["*"], exp=int(time.time()) + 120))
    missed = [publish(hubs.publish, topic, f"missed {n}") for n in range(2)]
    assert received(page, "typed", 3) == [[plain, "plain"], [missed[0], "missed 0"], [missed[1], "missed 1"]]
    timeline: list[list[Any]] = page.evaluate("logs.typed.timeline")
    error_at = next(t for what, t, *_ in timeline if what == "error")
    reopened_at = next(t for what, t, *_ in timeline if what == "open" and t > error_at)
    # reconnected after the update's retry (1.5 s), not Chromium's default 3 s
    assert 1200 <= reopened_at - error_at < 2900, timeline


def test_a_new_eventsource_resumes_from_lasteventid_on_either_gateway(hubs: Hubs, browser: Browser,
                                                                     contexts: list[BrowserContext]) -> None:
    topic = unique("books")
    ids = [publish(hubs.publish, topic, f"u{n}") for n in range(4)]
    for server in (hubs.subscribe, hubs.publish):
        page = open_page(browser, contexts, server)
        listen(page, "resumed", [("topic", topic), ("lastEventID", ids[1])])
        assert received(page, "resumed", 2) == [[ids[2], "u2"], [ids[3], "u3"]]
        listen(page, "everything", [("topic", topic), ("lastEventID", "earliest")])
        assert received(page, "everything", 4) == [[i, f"u{n}"] for n, i in enumerate(ids)]
