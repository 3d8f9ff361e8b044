"""Both pages survive the gateway process dying and a new one taking its port.

The embedded memory broker forgets everything when its process dies, so what can survive is
shown here: each page reconnects by itself (no reload), keeps what it showed exactly once,
and every message sent after the restart reaches both pages exactly once, read receipts
included.
"""

from __future__ import annotations

import uuid

import pytest
from playwright.sync_api import expect

from tests.browser.chat_page import LIVE, RECONNECT
from tests.browser.conftest import OpenChat
from tests.support.server import HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.mark.parametrize("transport", ["sse", "ws", "poll"])
def test_pages_reconnect_by_themselves_after_a_restart_and_nothing_is_missing_or_doubled(
    chat: OpenChat, transport: str
) -> None:
    room = f"restart-{transport}-{uuid.uuid4().hex[:8]}"
    first = HeraldServer().start()
    second: HeraldServer | None = None
    try:
        ann = chat(first, room, "ann", transport)
        bob = chat(first, room, "bob", transport)
        ann.expect_live(transport)
        bob.expect_live(transport)
        ann.send("before the restart")
        bob.expect_once("before the restart")
        ann.expect_read_by("before the restart", "bob")
        for page in (ann, bob):
            page.page.evaluate("window.sameDocument = true")

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
