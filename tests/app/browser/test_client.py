"""herald.js in the browser: retries, fallback, the async iterator, disconnects and gaps.

The network is bent with Playwright's routes (a dropped connection, a lost response, a 503,
a blocked transport, a gateway that cuts a stream short); everything else is the real
gateway process.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

import pytest
from playwright.sync_api import Page, Route, WebSocketRoute, expect

from tests.app.browser.conftest import OpenChat
from tests.support.server import HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def new_room(prefix: str) -> str:
    """A room no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stored_texts(server: HeraldServer, room: str) -> list[str]:
    """The texts of the messages the gateway holds for a room."""
    with urllib.request.urlopen(f"{server.url}/chats/{room}/messages", timeout=5) as response:
        return [m["text"] for m in json.load(response)["messages"]]


def test_submit_retries_lost_requests_and_a_503_with_one_idempotency_key(herald: HeraldServer, chat: OpenChat) -> None:
    room = new_room("retry")
    keys: list[str | None] = []

    def flaky(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        keys.append(route.request.header_value("idempotency-key"))
        if len(keys) == 1:
            route.abort("connectionreset")  # never reached the gateway
        elif len(keys) == 2:
            route.fetch()  # the gateway accepts it...
            route.abort("connectionreset")  # ...but the answer is lost
        elif len(keys) == 3:
            route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
                          body=json.dumps({"title": "Service unavailable", "status": 503, "detail": "busy"}))
        else:
            route.continue_()

    def prepare(page: Page) -> None:
        page.route(lambda url: url.endswith(f"/chats/{room}/messages"), flaky)

    ann = chat(herald, room, "ann", "sse", prepare=prepare)
    ann.expect_live("sse")
    # The room shows the message before the retries end; following its operation means the 202 came.
    with ann.page.expect_request(lambda r: "/operations/" in r.url and "/events" in r.url, timeout=15_000):
        ann.send("sent exactly once")
    expect(ann.status_of("sent exactly once")).to_have_attribute("data-status", "delivered")
    ann.expect_once("sent exactly once")
    assert len(keys) == 4
    assert keys[0] and len(set(keys)) == 1, f"the retries changed the Idempotency-Key: {keys}"
    assert stored_texts(herald, room) == ["sent exactly once"]


def test_falls_back_to_websocket_and_then_polling_when_faster_transports_are_blocked(
    herald: HeraldServer, chat: OpenChat
) -> None:
    room = new_room("fallback")

    def block_sse(page: Page) -> None:
        page.route(lambda url: "/events" in url, lambda route: route.abort("blockedbyclient"))

    def block_sse_and_ws(page: Page) -> None:
        block_sse(page)
        page.route_web_socket(lambda url: "/ws" in url, lambda ws: ws.close(code=1008, reason="blocked"))

    ann = chat(herald, room, "ann", prepare=block_sse)
    bob = chat(herald, room, "bob", prepare=block_sse_and_ws)
    ann.expect_live("ws")
    bob.expect_live("poll")

    ann.send("over the WebSocket")
    bob.expect_once("over the WebSocket")
    ann.expect_read_by("over the WebSocket", "bob")
    bob.send("by polling")
    ann.expect_once("by polling")
    bob.expect_read_by("by polling", "ann")


FOLLOW_SCRIPT = """
async ([room, transport, byUrl]) => {
  const { Herald } = await import("/herald.js");
  const herald = new Herald({ transport });
  const op = await herald.submit(`/chats/${room}/messages`, { author: "iter", text: transport });
  const stream = herald.follow(byUrl ? op.operation_url : op, { types: ["ChatMessageDelivered"] });
  const types = [];
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("no terminal event in 10 s")), 10000));
  await Promise.race([timeout, (async () => { for await (const event of stream) types.push(event.type); })()]);
  const result = await stream.done;
  return { types, text: result.result.text, state: stream.state.value, status: op.status };
}
"""


@pytest.mark.parametrize(("transport", "by_url"), [("sse", False), ("sse", True), ("ws", False), ("poll", False)])
def test_follow_iterates_an_operation_to_its_end(herald: HeraldServer, chat: OpenChat, transport: str,
                                                 by_url: bool) -> None:
    page = chat(herald, "", "iter", join=False).page
    out: dict[str, Any] = page.evaluate(FOLLOW_SCRIPT, [new_room("iter"), transport, by_url])
    assert out["status"] == "pending"
    assert out["text"] == transport
    assert out["state"] == "closed"
    if transport == "poll":  # polling sees status changes only, and may see "running" or not
        assert out["types"][-1] == "herald.operation.succeeded"
        assert set(out["types"]) <= {"herald.operation.running", "herald.operation.succeeded"}
    else:
        assert out["types"] == ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]


COMPARE_SCRIPT = """
async (cases) => {
  const { compareCursors } = await import("/herald.js");
  return cases.map(([a, b]) => compareCursors(a, b));
}
"""


def test_a_cursor_of_a_new_history_is_newer_whatever_its_position(herald: HeraldServer, chat: OpenChat) -> None:
    # herald.js drops an event whose cursor is not newer than the last one it delivered: after a lost
    # history (a new epoch) every event of the new one must pass, even at an older position
    cases = [
        ("2-0.k3x9", "1-0.k3x9", 1), ("1-0.k3x9", "2-0.k3x9", -1), ("1-0.k3x9", "1-0.k3x9", 0),
        ("1-0.a1", "9-0.k3x9", 1),  # another epoch
        ("5-0.k3x9", "0-0", 1), ("5-0", "5-0.k3x9", 0),  # a plain cursor is ordered by position
        ("10-0", "9-0", 1),
    ]
    page = chat(herald, "", "cmp", join=False).page
    assert page.evaluate(COMPARE_SCRIPT, [[a, b] for a, b, _ in cases]) == [want for _, _, want in cases]


def fake_message(room: str) -> dict[str, Any]:
    """A message event as the gateway would have pushed it before cutting the stream."""
    return {
        "specversion": "1.0", "id": "ev-fake", "source": "test", "type": "ChatMessageDelivered",
        "data": {"id": "m_cutcutcut01", "room": room, "author": "zed", "text": "just before the cut",
                 "sent_at": "2026-01-01T12:00:00.000Z", "read_by": [], "operation_id": "op_cut"},
    }


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_disconnect_reconnects_at_once_with_the_cursor_and_a_gap_is_shown(
    herald: HeraldServer, chat: OpenChat, transport: str
) -> None:
    room = new_room(f"cut-{transport}")
    topic = f"chats/{room}"
    event = fake_message(room)
    gap = {"topic": topic, "cursor": "0-0", "oldest": "4-0", "detail": "events after your cursor are gone"}
    resumed_at: list[str | None] = []

    def cut_sse(route: Route) -> None:
        if resumed_at or not route.request.url.split("?")[0].endswith(f"/topics/{topic}/events"):
            resumed_at.append(route.request.url)
            route.continue_()
            return
        resumed_at.append(None)
        body = (
            "retry: 600000\n\n"  # the browser's own reconnect would come far too late: herald.js must act
            f"id: 5-0\nevent: ChatMessageDelivered\ndata: {json.dumps(event)}\n\n"
            f"event: herald.gap\ndata: {json.dumps(gap)}\n\n"
            "event: herald.disconnect\ndata: "
            + json.dumps({"reason": "slow-consumer", "reconnect": True, "cursor": "5-0"}) + "\n\n"
        )
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    def cut_ws(ws: WebSocketRoute) -> None:
        if not resumed_at:  # the first socket: a fake gateway that sends one event, a gap, then goes
            resumed_at.append(None)

            def on_message(message: str | bytes) -> None:
                frame = json.loads(message)
                if frame["type"] == "subscribe":
                    ws.send(json.dumps({"type": "subscribed", "topic": topic, "cursor": "0-0", "id": frame["id"]}))
                    ws.send(json.dumps({"type": "event", "topic": topic, "cursor": "5-0", "event": event}))
                    ws.send(json.dumps({"type": "gap", **gap}))
                    ws.close(code=4008, reason="slow consumer")

            ws.on_message(on_message)
            return
        server = ws.connect_to_server()

        def forward(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame["type"] == "subscribe" and frame["topic"] == topic:
                resumed_at.append(frame.get("cursor"))
            server.send(message)

        ws.on_message(forward)

    def prepare(page: Page) -> None:
        if transport == "sse":
            page.route(lambda url: f"/topics/{topic}/events" in url, cut_sse)
        else:
            page.route_web_socket(lambda url: "/ws" in url, cut_ws)

    ann = chat(herald, room, "ann", transport, prepare=prepare)
    ann.expect_once("just before the cut")
    expect(ann.page.locator("#notice")).to_contain_text("were missed")
    ann.expect_live(transport)
    assert len(resumed_at) >= 2 and resumed_at[0] is None
    resumed = resumed_at[1]
    assert resumed is not None
    assert ("last_event_id=5-0" in resumed) if transport == "sse" else resumed == "5-0"

    ann.send("after the cut")
    expect(ann.status_of("after the cut")).to_have_attribute("data-status", "delivered")
    ann.expect_once("just before the cut")
