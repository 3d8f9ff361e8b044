"""herald.js past the end of its subscribe token (issue 13, finding 14), in Chromium.

The gateway hands out 3 s tokens (``HERALD_TOKEN_TTL=3``) and ends each stream when its token
expires. The chat page must go on: herald.js calls the page's ``refresh`` for fresh URLs and
resumes with its cursor. An init script watches the wire (every ``EventSource`` and ``WebSocket``
the page opens): which token and cursor each connection started with, and each message received.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.app.browser.conftest import OpenChat
from tests.support.server import HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

TOKEN_TTL = 3
SPACING_MS = 700  # between messages: a dozen of them span more than two token lifetimes

WIRE_SCRIPT = """
(() => {
  const wire = (window.__wire = { opens: [], delivered: [] });
  const note = (raw) => {
    try {
      const doc = JSON.parse(raw);
      const event = doc.type === "event" ? doc.event : doc;
      if (event && event.type === "ChatMessageDelivered") wire.delivered.push(event.data.text);
    } catch {}
  };
  const NativeEventSource = window.EventSource;
  window.EventSource = class extends NativeEventSource {
    constructor(url, options) {
      super(url, options);
      const parsed = new URL(url, location.href);
      if (!parsed.pathname.startsWith("/topics/")) return;  // the page's own operations are not watched
      wire.opens.push({ token: parsed.searchParams.get("token"), cursor: parsed.searchParams.get("last_event_id") });
      this.addEventListener("ChatMessageDelivered", (message) => note(message.data));
    }
  };
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.addEventListener("message", (message) => note(message.data));
    }
    send(data) {
      try {
        const frame = JSON.parse(data);
        if (frame.type === "subscribe" && frame.topic.startsWith("chats/")) {
          wire.opens.push({ token: frame.token ?? null, cursor: frame.cursor ?? null });
        }
      } catch {}
      super.send(data);
    }
  };
})();
"""


@pytest.fixture(scope="module")
def short_tokens() -> Iterator[HeraldServer]:
    """A gateway whose subscribe tokens last ``TOKEN_TTL`` seconds."""
    with HeraldServer({"HERALD_TOKEN_TTL": str(TOKEN_TTL)}) as server:
        yield server


def post_message(server: HeraldServer, room: str, text: str) -> None:
    """Send a message to the room from outside the page, as another client would."""
    request = urllib.request.Request(
        f"{server.url}/chats/{room}/messages", method="POST",
        data=json.dumps({"author": "bob", "text": text}).encode(), headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202


def watch_wire(page: Page) -> None:
    """Record the page's connections and what they receive (before the page loads)."""
    page.add_init_script(WIRE_SCRIPT)


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_chat_page_goes_on_past_its_tokens_with_fresh_urls_each_message_once(
    short_tokens: HeraldServer, chat: OpenChat, transport: str
) -> None:
    room = f"ttl-{transport}-{uuid.uuid4().hex[:8]}"
    ann = chat(short_tokens, room, "ann", transport, prepare=watch_wire)
    ann.expect_live(transport)
    texts = [f"message {i}" for i in range(12)]
    for text in texts:
        post_message(short_tokens, room, text)
        ann.page.wait_for_timeout(SPACING_MS)
    for text in texts:
        ann.expect_once(text)
    ann.expect_live(transport)
    wire: dict[str, Any] = ann.page.evaluate("window.__wire")
    doubled = {text: n for text, n in Counter(wire["delivered"]).items() if n > 1}
    assert not doubled, f"received more than once: {doubled}"
    assert sorted(wire["delivered"]) == sorted(texts)
    opens = wire["opens"]
    assert len(opens) >= 3, f"the stream was not renewed as its tokens expired: {opens}"
    tokens = [o["token"] for o in opens]
    assert all(tokens) and len(set(tokens)) == len(tokens), "a reconnect reused an expired token"
    assert all(o["cursor"] for o in opens), "a connection started without the cursor"
