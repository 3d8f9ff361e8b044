"""Fixtures for the browser tests: headless system Chromium (never a downloaded one) and Herald.

Playwright's sync API drives ``/usr/bin/chromium``; the gateway is a real uvicorn subprocess
on a free loopback port (:class:`tests.support.server.HeraldServer`). Every page opened
through ``chat`` is watched for uncaught JavaScript errors, which fail the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.app.browser.chat_page import ChatPage
from tests.support.server import HeraldServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

OpenChat = Callable[..., ChatPage]


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """One headless Chromium for all the browser tests."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="package")
def herald() -> Iterator[HeraldServer]:
    """A gateway shared by the tests that do not restart it (each uses rooms of its own)."""
    with HeraldServer() as server:
        yield server


@pytest.fixture
def chat(browser: Browser) -> Iterator[OpenChat]:
    """``chat(server, room, name, transport=None, ...)``: a chat page in a browser context of its own."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_chat(server: HeraldServer, room: str, name: str, transport: str | None = None, *,
                  viewport: dict[str, int] | None = None, join: bool = True,
                  prepare: Callable[[Page], object] | None = None) -> ChatPage:
        context = browser.new_context(viewport=viewport or {"width": 820, "height": 640})  # type: ignore[arg-type]
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{name}: {exc}"))
        if prepare is not None:
            prepare(page)  # e.g. routes that block a transport, before the page loads
        return ChatPage.open(page, server.url, room, name, transport, join=join)

    yield open_chat
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
