"""The chat page in a real Chromium against a real gateway process.

Two people (two browser contexts) share a room; each forced transport must carry a message
to the other live and the read receipt back.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.app.browser.conftest import OpenChat
from tests.support.server import ROOT, HeraldServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "chat.png"


def new_room(prefix: str) -> str:
    """A room no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def save_screenshot(png: bytes, name: str) -> Path:
    """Keep a screenshot under test-artifacts/ (gitignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(png)
    return path


@pytest.mark.parametrize("transport", ["sse", "ws", "poll"])
def test_message_reaches_the_other_page_live_and_the_read_receipt_comes_back(
    herald: HeraldServer, chat: OpenChat, transport: str
) -> None:
    room = f"team-{transport}"  # readable in the screenshot; the package's gateway is fresh per session
    ann = chat(herald, room, "ann", transport)
    bob = chat(herald, room, "bob", transport)
    ann.expect_live(transport)
    bob.expect_live(transport)

    question = f"Hi Bob, is the {transport} deploy done?"
    ann.send(question)
    bob.expect_once(question)
    ann.expect_read_by(question, "bob")

    answer = "Yes, shipped it an hour ago."
    bob.send(answer)
    ann.expect_once(answer)
    bob.expect_read_by(answer, "ann")

    for page in (ann, bob):
        expect(page.messages).to_have_count(2)
    expect(ann.message(question)).to_have_class("message own")
    expect(bob.message(question)).to_have_class("message")
    expect(ann.status_of(question)).not_to_contain_text("ann")

    ann.message_box.fill("Great, thanks!")
    path = save_screenshot(ann.page.screenshot(), f"chat-{transport}.png")
    if transport == "sse" and os.environ.get("HERALD_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, DOCS_SCREENSHOT)


def test_an_over_long_message_shows_the_problem_title_and_keeps_the_draft(herald: HeraldServer, chat: OpenChat) -> None:
    ann = chat(herald, new_room("error"), "ann", "sse")
    ann.expect_live("sse")
    too_long = "x" * 2001
    ann.send(too_long)
    expect(ann.error_title).to_have_text("Message too long")
    expect(ann.page.get_by_role("alert")).to_contain_text("longer than 2000 characters")
    expect(ann.messages).to_have_count(0)
    expect(ann.message_box).to_have_value(too_long)
    expect(ann.page.locator("#count")).to_have_text("2001/2000")

    ann.send("short enough")
    expect(ann.page.get_by_role("alert")).to_be_hidden()
    expect(ann.status_of("short enough")).to_have_attribute("data-status", "delivered")


def test_joining_and_sending_by_keyboard_alone_on_a_phone_sized_screen(herald: HeraldServer, chat: OpenChat) -> None:
    room = new_room("phone")
    ann = chat(herald, room, "ann", join=False, viewport={"width": 360, "height": 640})
    page = ann.page
    expect(page.get_by_label("Your name")).to_be_focused()
    page.keyboard.type("ann")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Room")).to_be_focused()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type(room)
    page.keyboard.press("Enter")

    expect(ann.message_box).to_be_focused()
    ann.expect_live("sse")
    assert page.url.endswith(f"/?room={room}&name=ann"), "the address is not a shareable link"
    expect(page.get_by_role("link", name="Invite link")).to_have_attribute("href", f"/?room={room}")

    long_word = "a" * 300
    page.keyboard.type(long_word)
    page.keyboard.press("Enter")
    expect(ann.status_of(long_word)).to_have_attribute("data-status", "delivered")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Send")).to_be_focused()

    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow == 0, f"the page scrolls sideways by {overflow}px on a phone"
    expect(ann.message_box).to_be_in_viewport()
    expect(ann.message(long_word)).to_be_in_viewport()
    save_screenshot(page.screenshot(), "chat-phone.png")
