"""Both pages survive the gateway process dying and a new one taking its port.

The embedded memory broker forgets everything when its process dies, so what can survive is
shown here: each page reconnects by itself (no reload), keeps what it showed exactly once,
and every message sent after the restart reaches both pages exactly once, read receipts
included. On Redis the history survives too: a page whose gateway was down gets what was
sent meanwhile (through another gateway), exactly once.
"""

from __future__ import annotations

import uuid

import pytest
from playwright.sync_api import expect

from tests.app.browser.chat_page import LIVE, RECONNECT, ChatPage
from tests.app.browser.conftest import OpenChat
from tests.support.server import HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def chat_before_the_restart(chat: OpenChat, ann_gateway: HeraldServer, bob_gateway: HeraldServer, room: str,
                            transport: str) -> tuple[ChatPage, ChatPage]:
    """Ann and Bob live in the room, one message exchanged, each page marked to detect a reload."""
    ann = chat(ann_gateway, room, "ann", transport)
    bob = chat(bob_gateway, room, "bob", transport)
    ann.expect_live(transport)
    bob.expect_live(transport)
    ann.send("before the restart")
    bob.expect_once("before the restart")
    ann.expect_read_by("before the restart", "bob")
    for page in (ann, bob):
        page.page.evaluate("window.sameDocument = true")
    return ann, bob


@pytest.mark.parametrize("transport", ["sse", "ws", "poll"])
def test_pages_reconnect_by_themselves_after_a_restart_and_nothing_is_missing_or_doubled(
    chat: OpenChat, transport: str
) -> None:
    room = f"restart-{transport}-{uuid.uuid4().hex[:8]}"
    first = HeraldServer().start()
    second: HeraldServer | None = None
    try:
        ann, bob = chat_before_the_restart(chat, first, first, room, transport)

        first.kill()
        for page in (ann, bob):
            expect(page.connection).to_have_attribute("data-state", "reconnecting", timeout=RECONNECT)

        second = HeraldServer(port=first.port).start()
        for page in (ann, bob):
            page.expect_live(transport, timeout=RECONNECT)

        ann.send("after the restart, from ann")
        bob.send("after the restart, from bob")
        for page in (ann, bob):
            page.expect_once("after the restart, from ann")
            page.expect_once("after the restart, from bob")
        ann.expect_read_by("after the restart, from ann", "bob")
        bob.expect_read_by("after the restart, from bob", "ann")

        for page in (ann, bob):
            assert page.page.evaluate("window.sameDocument") is True, "the page was reloaded"
            page.expect_once("before the restart")
            expect(page.messages).to_have_count(3)
            expect(page.connection).to_have_attribute("data-state", LIVE[transport])
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.redis
@pytest.mark.parametrize("transport", ["sse", "ws", "poll"])
def test_on_redis_a_page_gets_what_was_sent_while_its_gateway_was_down_exactly_once(
    chat: OpenChat, redis_url: str, transport: str
) -> None:
    room = f"redis-{transport}-{uuid.uuid4().hex[:8]}"
    # Two gateways share one Redis; the chat worker runs in the one that stays up.
    ann_env = {"REDIS_URL": redis_url, "HERALD_EMBEDDED_WORKER": "0"}
    ann_gateway = HeraldServer(ann_env).start()
    bob_gateway = HeraldServer({"REDIS_URL": redis_url, "HERALD_EMBEDDED_WORKER": "1"}).start()
    restarted: HeraldServer | None = None
    meanwhile = ["sent while ann's gateway was down", "and once more while it was down"]
    try:
        ann, bob = chat_before_the_restart(chat, ann_gateway, bob_gateway, room, transport)

        ann_gateway.kill()
        expect(ann.connection).to_have_attribute("data-state", "reconnecting", timeout=RECONNECT)
        for text in meanwhile:
            bob.send(text)
            expect(bob.status_of(text)).to_have_attribute("data-status", "delivered")

        restarted = HeraldServer(ann_env, port=ann_gateway.port).start()
        ann.expect_live(transport, timeout=RECONNECT)
        for text in meanwhile:
            ann.expect_once(text)
            bob.expect_read_by(text, "ann")
        ann.send("after the restart")
        bob.expect_once("after the restart")
        ann.expect_read_by("after the restart", "bob")

        assert ann.page.evaluate("window.sameDocument") is True, "the page was reloaded"
        for page in (ann, bob):
            for text in ["before the restart", *meanwhile, "after the restart"]:
                page.expect_once(text)
            expect(page.messages).to_have_count(4)
    finally:
        ann_gateway.stop()
        bob_gateway.stop()
        if restarted is not None:
            restarted.stop()
