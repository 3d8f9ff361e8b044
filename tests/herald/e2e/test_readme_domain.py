"""The README's "your own domain" example works as printed, served as a real process.

The ``python`` block after the ``readme-domain`` marker is written to a temporary directory as
``shop.py`` and served as the README says, ``herald serve --domain shop:orders`` (as ``python -m
herald``), on a free port: the embedded default, memory broker and the domain's handlers
in-process. The test then takes the whole path a client takes: ``POST /orders`` → ``202``, the
operation's SSE stream to its terminal event, and the ``303`` from the operation to the order it
created.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import ROOT, HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
MARKER = "<!-- readme-domain"
MODULE, ATTRIBUTE = "shop", "orders"
SERVE = f"herald serve --domain {MODULE}:{ATTRIBUTE}"
STREAM_TIMEOUT = 10.0


def domain_source(text: str) -> str:
    """The first ``python`` block after the README's ``readme-domain`` marker."""
    start = text.index(MARKER)
    found = re.search(r"^```python\n(.*?)^```", text[start:], re.MULTILINE | re.DOTALL)
    assert found is not None, "no ```python block after the readme-domain marker"
    return found.group(1)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[str]:
    """The README's domain served by ``herald serve --domain shop:orders`` on a free port; its base URL."""
    (tmp_path / f"{MODULE}.py").write_text(domain_source(README.read_text()))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with HeraldServer(env, target=SERVE.split()[2:]) as server:  # stopped (SIGTERM, then SIGKILL) on exit
        yield server.url


def test_the_readme_shows_how_to_serve_its_domain() -> None:
    text = README.read_text()
    section = text[text.index(MARKER):]
    assert "from herald import" in domain_source(text)
    assert SERVE in section
    assert f"herald worker {MODULE}:{ATTRIBUTE}" in section


async def test_the_readme_domain_accepts_pushes_and_redirects(shop: str) -> None:
    async with httpx.AsyncClient(base_url=shop, timeout=5.0) as client:
        refused = await client.post("/orders", json={"item": "tea", "qty": 0})
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "qty"

        accepted = await client.post("/orders", json={"item": "tea", "qty": 2})
        assert accepted.status_code == 202, accepted.text
        op = accepted.json()
        assert accepted.headers["location"] == op["operation_url"] == f"/operations/{op['id']}"

        async with sse_connect(client, op["subscribe_url"], timeout=STREAM_TIMEOUT) as stream:
            assert stream.response.status_code == 200
            blocks = await stream.until_end(timeout=STREAM_TIMEOUT)
        events = [block.json() for block in blocks if block.is_message]
        assert [e["type"] for e in events] == [
            "herald.operation.running", "OrderConfirmed", "herald.operation.succeeded"]
        assert {e["correlationid"] for e in events} == {op["id"]}
        order = {"id": op["id"], "item": "tea", "qty": 2}
        assert events[1]["data"] == order

        redirect = await client.get(op["operation_url"])
        assert redirect.status_code == 303
        assert redirect.headers["location"] == f"/orders/{op['id']}"

        created = await client.get(redirect.headers["location"])
        assert created.status_code == 200, created.text
        body = created.json()
        assert {k: body[k] for k in order} == order
        assert body["subscribe_url"].startswith(f"/topics/orders/{op['id']}/events?token=")
