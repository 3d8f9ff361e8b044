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

from tests.browser.conftest import OpenChat
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
    room = new_room(transport)
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
