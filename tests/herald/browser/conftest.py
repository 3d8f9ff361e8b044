"""The library's own browser tests run in the headless system Chromium of the chat's browser tests."""

from __future__ import annotations

from tests.app.browser.conftest import browser

__all__ = ["browser"]
