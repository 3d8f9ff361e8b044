"""Backends publish to a chat room over HTTP; a browser and a WebSocket follow it (issue 15, part 1).

The real ``curl`` binary posts a batch and a Python client (httpx) posts single events to
``POST /topics/chats/<room>/events`` of a real gateway process, with a publisher token. Chromium
shows the room's page, and a WebSocket client (the websockets library, with the token the room
hands out) follows the same topic. Each gets every event once, in the order published.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
from playwright.sync_api import Page, expect
from websockets.sync.client import connect

from tests.app.browser.conftest import OpenChat
from tests.support.server import HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PUBLISH_KEY = "publisher-key-for-browser-tests-0123456789"
RECORD_DELIVERIES = """
window.__delivered = [];
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    this.addEventListener("ChatMessageDelivered", (e) => {
      window.__delivered.push([e.lastEventId, JSON.parse(e.data).data.id]);
    });
  }
};
"""
"""An init script recording every ``ChatMessageDelivered`` the page's EventSources get: (cursor, message id)."""


@pytest.fixture(scope="module")
def gateway() -> Iterator[HeraldServer]:
    """The chat application with a publisher key."""
    with HeraldServer({"HERALD_PUBLISH_JWT_SECRET": PUBLISH_KEY}) as server:
        yield server


def publisher_token(*patterns: str) -> str:
    """A publisher token whose ``herald.publish`` claim lists ``patterns``."""
    return jwt.encode({"sub": "announcements", "exp": int(time.time()) + 300, "herald": {"publish": list(patterns)}},
                      PUBLISH_KEY, "HS256")


def message(room: str, mid: str, text: str) -> dict[str, Any]:
    """A ``ChatMessageDelivered`` event whose data is shaped like a message the chat worker stores."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"type": "ChatMessageDelivered", "subject": f"/chats/{room}/messages/{mid}",
            "data": {"id": mid, "room": room, "author": "announcements", "text": text, "sent_at": now,
                     "delivered_at": now, "read_by": []}}


class SocketFollower(threading.Thread):
    """A WebSocket client on ``websocket_url`` collecting event frames until it has ``count`` (or times out)."""

    def __init__(self, url: str, count: int, timeout: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.url, self.count, self.timeout = url, count, timeout
        self.subscribed = threading.Event()
        self.frames: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        """Connect, wait for ``subscribed``, then collect ``event`` frames."""
        deadline = time.monotonic() + self.timeout
        try:
            with connect(self.url, open_timeout=10, proxy=None) as ws:
                while len(self.frames) < self.count and time.monotonic() < deadline:
                    try:
                        raw = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                    except TimeoutError:
                        break
                    frame = orjson.loads(raw)
                    if frame["type"] == "subscribed":
                        self.subscribed.set()
                    elif frame["type"] == "event":
                        self.frames.append(frame)
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.subscribed.set()


def curl_publish(server: HeraldServer, topic: str, token: str, body: Any) -> dict[str, Any]:
    """``curl -X POST /topics/<topic>/events`` with a JSON body; the answer's JSON (fails on a non-200)."""
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body", "--max-time", "10", "-X", "POST",
         f"{server.url}/topics/{topic}/events", "-H", f"Authorization: Bearer {token}",
         "-H", "Content-Type: application/json", "--data-binary", json.dumps(body)],
        capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stdout + done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_curl_and_a_python_client_publish_to_a_room_that_a_browser_and_a_websocket_follow(
    gateway: HeraldServer, chat: OpenChat
) -> None:
    room = f"announce-{uuid.uuid4().hex[:8]}"
    topic = f"chats/{room}"
    token = publisher_token("chats/*")
    page = chat(gateway, room, "ann", "sse", prepare=lambda p: p.add_init_script(RECORD_DELIVERIES))
    page.expect_live("sse")
    room_doc = httpx.get(f"{gateway.url}/chats/{room}").json()
    follower = SocketFollower(room_doc["websocket_url"], count=6)
    follower.start()
    assert follower.subscribed.wait(10) and follower.error is None, follower.error

    by_curl = [message(room, f"m_curl{i}", f"from curl {i}") for i in range(3)]
    by_python = [message(room, f"m_python{i}", f"from python {i}") for i in range(3)]
    answers = curl_publish(gateway, topic, token, by_curl)["events"]
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}) as client:
        for event in by_python:
            response = client.post(f"/topics/{topic}/events", json=event)
            assert response.status_code == 200, response.text
            answers.extend(response.json()["events"])
    cursors = [a["cursor"] for a in answers]
    ids = [e["data"]["id"] for e in by_curl + by_python]

    expect(page.messages).to_have_count(6)
    texts = page.messages.locator(".text").all_inner_texts()
    assert texts == [e["data"]["text"] for e in by_curl + by_python]
    expect(page.message("from python 2")).to_contain_text("from python 2")
    delivered = _delivered(page.page, 6)
    assert delivered == [[cursor, mid] for cursor, mid in zip(cursors, ids, strict=True)]  # once each, in order

    follower.join(20)
    assert follower.error is None, follower.error
    assert [(f["topic"], f["cursor"], f["event"]["data"]["id"]) for f in follower.frames] == [
        (topic, cursor, mid) for cursor, mid in zip(cursors, ids, strict=True)]
    assert [f["event"]["id"] for f in follower.frames] == [a["id"] for a in answers]
    assert {f["event"]["source"] for f in follower.frames} == {"herald/publish/announcements"}


def _delivered(page: Page, count: int, timeout: float = 10.0) -> list[list[str]]:
    """What the page's EventSources received, once ``count`` deliveries came (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        delivered: list[list[str]] = page.evaluate("window.__delivered")
        if len(delivered) >= count or time.monotonic() > deadline:
            page.wait_for_timeout(300)  # a duplicate would come right after
            more: list[list[str]] = page.evaluate("window.__delivered")
            return more
        page.wait_for_timeout(50)


def test_a_token_for_orders_cannot_publish_to_the_room(gateway: HeraldServer) -> None:
    response = httpx.post(f"{gateway.url}/topics/chats/x/events", json=message("x", "m_nope", "nope"),
                          headers={"Authorization": f"Bearer {publisher_token('orders/*')}"})
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
