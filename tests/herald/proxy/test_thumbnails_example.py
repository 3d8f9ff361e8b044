"""docs/proxy.md's example, as written in docs/examples/thumbnails: a 2 s thumbnail service fronted by Herald.

The service (``thumbnailer.py``) runs as a uvicorn process of its own; Herald serves the example's
``herald.toml`` (its upstream moved to the service's port) and its page with ``--static``; headless
Chromium opens the page, which submits a thumbnail with ``/herald.js`` and follows the operation to
its end: the service's progress events, the success, and the thumbnail read through the proxied route.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.app.browser.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.support.server import ROOT, HeraldServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

EXAMPLE = ROOT / "docs" / "examples" / "thumbnails"


@pytest.fixture
def thumbnailer() -> Iterator[str]:
    """``thumbnailer.py`` under uvicorn on a free port; its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "thumbnailer:app", "--app-dir", str(EXAMPLE),
                                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(url + "/thumbnails/none", timeout=1)
            except urllib.error.HTTPError:
                break  # the 404 of a service that runs
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the thumbnailer did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def gateway(thumbnailer: str, tmp_path: Path) -> Iterator[HeraldServer]:
    """``herald serve --config herald.toml --static static`` with the example's files, pointed at the service."""
    config = (EXAMPLE / "herald.toml").read_text()
    assert "http://127.0.0.1:9000" in config
    (tmp_path / "herald.toml").write_text(config.replace("http://127.0.0.1:9000", thumbnailer))
    shutil.copy(EXAMPLE / "thumbnail.schema.json", tmp_path)
    server = HeraldServer({"HERALD_LOG_LEVEL": "warning"},
                          target=("--config", str(tmp_path / "herald.toml"), "--static", str(EXAMPLE / "static")))
    with server:
        yield server


def test_the_browser_follows_a_thumbnail_from_submit_to_the_proxied_result(gateway: HeraldServer) -> None:
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(gateway.url + "/")
            started = time.monotonic()
            page.click("button")
            page.locator("#result:not(:empty)").wait_for()  # the page's CSP allows no eval: no wait_for_function
            took = time.monotonic() - started
            lines = page.locator("#log li").all_text_contents()
            result = page.text_content("#result") or ""
        finally:
            browser.close()
    assert not errors, errors
    assert took >= 2.0  # the service takes 2 s; the page heard of it as it went
    assert [line.split(" ")[0] for line in lines] == [
        "herald.operation.running", "herald.operation.progress", "ThumbnailProgressed", "ThumbnailProgressed",
        "ThumbnailProgressed", "herald.operation.succeeded"]
    assert [line.split(" ", 1)[1] for line in lines[2:5]] == ['{"percent":25}', '{"percent":50}', '{"percent":75}']
    assert '"thumbnail":"https://example.com/cat.jpg?thumbnail=128x128"' in result
