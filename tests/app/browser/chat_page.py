"""The chat page as the tests see it: what a person reads and does, by role, label and text."""

from __future__ import annotations

import re
from urllib.parse import urlencode

from playwright.sync_api import Locator, Page, expect

LIVE = {"sse": "live-sse", "ws": "live-ws", "poll": "polling"}
LABELS = {"sse": "Live via SSE", "ws": "Live via WebSocket", "poll": "Live via polling"}

# Timeouts (ms)
SEEN = 10_000  # an event pushed to another page, or a read receipt coming back
RECONNECT = 30_000  # a page noticing a lost gateway and coming back to a new one


class ChatPage:
    """One person in one room."""

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name

    @classmethod
    def open(cls, page: Page, base_url: str, room: str, name: str, transport: str | None = None, *,
             join: bool = True) -> ChatPage:
        """Load ``/?room=..&name=..[&transport=..]`` (or ``/`` to join by hand)."""
        query = {"room": room, "name": name} if join else {}
        if transport:
            query["transport"] = transport
        page.goto(f"{base_url}/?{urlencode(query)}" if query else f"{base_url}/")
        return cls(page, name)

    @property
    def connection(self) -> Locator:
        """The connection indicator."""
        return self.page.locator("#connection")

    def expect_live(self, transport: str, timeout: float = SEEN) -> None:
        """The indicator says the page is live over ``transport``."""
        expect(self.connection).to_have_attribute("data-state", LIVE[transport], timeout=timeout)
        expect(self.connection).to_have_text(LABELS[transport])

    @property
    def message_box(self) -> Locator:
        """The text box labelled "Message as <name>"."""
        return self.page.get_by_role("textbox", name=f"Message as {self.name}")

    def send(self, text: str) -> None:
        """Type into the message box and press Enter."""
        box = self.message_box
        box.fill(text)
        box.press("Enter")

    @property
    def messages(self) -> Locator:
        """Every message on the page."""
        return self.page.locator("#messages li.message")

    def message(self, text: str) -> Locator:
        """The message(s) whose text is exactly ``text``."""
        return self.messages.filter(has=self.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$")))

    def status_of(self, text: str) -> Locator:
        """The delivery status line of an own message."""
        return self.message(text).locator(".status")

    def expect_read_by(self, text: str, reader: str, timeout: float = SEEN) -> None:
        """An own message shows that ``reader`` has read it."""
        status = self.status_of(text)
        expect(status).to_have_attribute("data-status", "read", timeout=timeout)
        expect(status).to_contain_text(f"Read by {reader}")

    def expect_once(self, text: str, timeout: float = SEEN) -> None:
        """Exactly one message with this text is shown."""
        expect(self.message(text)).to_have_count(1, timeout=timeout)

    @property
    def error_title(self) -> Locator:
        """The title of the problem shown in the alert."""
        return self.page.get_by_role("alert").locator(".title")
