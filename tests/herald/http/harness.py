"""In-process Herald for the HTTP tests: the app with its lifespan, over ASGI or a real socket.

:class:`Herald` talks to the app through ``httpx.ASGITransport`` (plain request/response).
:class:`LiveHerald` also serves it with ``uvicorn.Server`` on a free loopback port inside the
test's event loop, for what ASGITransport cannot do: streaming SSE and WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from app.main import create_app
from herald import Domain
from herald import create_app as create_herald_app
from herald.broker.base import Broker
from herald.http.gateway import Gateway
from herald.http.problems import PROBLEM_BASE, PROBLEM_JSON
from herald.settings import Settings
from tests.support.server import HERALD_HTTP, HERALD_WS, TEST_SECRET


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test app: a fixed secret, quiet logs, no rate limit, and ``overrides``.

    Every request of an in-process test comes from one address, in bursts no client sends: the
    anonymous default rate limit (``rate_limit=None``) is tested where it is the subject.
    """
    return Settings(**{"secret": TEST_SECRET, "log_level": "warning", "rate_limit": 0, **overrides})


def make_app(domains: Iterable[Domain] | None, **overrides: Any) -> Starlette:
    """The chat application, or Herald serving only ``domains`` when given, built from ``make_settings``."""
    settings = make_settings(**overrides)
    return create_app(settings) if domains is None else create_herald_app(settings, domains=domains)


class Herald:
    """One in-process app and an ASGI client for it."""

    def __init__(self, app: Starlette, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def gateway(self) -> Gateway:
        """The app's gateway (settings, broker, hub, signer)."""
        gateway: Gateway = self.app.state.gateway
        return gateway

    @property
    def broker(self) -> Broker:
        """The app's broker."""
        return self.gateway.broker

    async def send(
        self,
        room: str = "lobby",
        text: str = "hello",
        author: str = "ann",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """``POST /chats/{room}/messages``."""
        return await self.client.post(f"/chats/{room}/messages", json={"author": author, "text": text},
                                      headers=dict(headers or {}))

    async def wait_status(self, operation_id: str, *statuses: str, timeout: float = 5.0) -> dict[str, Any]:
        """Poll ``?view=status`` until the operation has one of ``statuses``; its document."""
        async with asyncio.timeout(timeout):
            while True:
                response = await self.client.get(f"/operations/{operation_id}", params={"view": "status"})
                assert response.status_code == 200, response.text
                doc: dict[str, Any] = response.json()
                if doc["status"] in statuses:
                    return doc
                await asyncio.sleep(0.01)


class LiveHerald(Herald):
    """An app served by uvicorn on 127.0.0.1; ``client`` speaks real HTTP to it."""

    def __init__(self, app: Starlette, client: httpx.AsyncClient, port: int) -> None:
        super().__init__(app, client)
        self.port = port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<port>``."""
        return f"ws://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def in_process(*, domains: Iterable[Domain] | None = None, **overrides: Any) -> AsyncIterator[Herald]:
    """An app built from ``make_settings(**overrides)`` with its lifespan running.

    The chat application, unless ``domains`` says which domains Herald serves instead.
    """
    app = make_app(domains, **overrides)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://herald.test") as client:
            yield Herald(app, client)


@contextlib.asynccontextmanager
async def served(
    *, http: str = HERALD_HTTP, ws: str = HERALD_WS, domains: Iterable[Domain] | None = None,
    prepare: Callable[[Starlette], None] | None = None, callback_to_self: bool = False, **overrides: Any
) -> AsyncIterator[LiveHerald]:
    """An app built from ``make_settings(**overrides)``, served by uvicorn on a free loopback port.

    ``http`` and ``ws`` are uvicorn's HTTP and WebSocket protocols: Herald's own (herald/http/fastwrite.py,
    as ``herald serve`` runs them) unless a test asks for uvicorn's (``"httptools"``, ``"h11"``,
    ``"websockets-sansio"``). ``prepare(app)`` runs
    before the app starts (to add a middleware, say). ``callback_to_self`` makes the app's own URL its
    ``callback_url`` (unless ``overrides`` name one), for upstreams that call the callback API back.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if callback_to_self:
        overrides = {"callback_url": f"http://127.0.0.1:{port}", **overrides}
    try:
        app = make_app(domains, **overrides)
        if prepare is not None:
            prepare(app)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=1,
                            http=http, ws=ws)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-{port}")
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # raises what stopped it
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield LiveHerald(app, client, port)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        finally:
            sock.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds (the app's internal state offers no event to await)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def assert_problem(response: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """Check ``response`` is an RFC 9457 problem with ``status`` (and type ``kind``); its document."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"] == PROBLEM_JSON
    doc: dict[str, Any] = response.json()
    assert doc["status"] == status
    assert isinstance(doc["title"], str) and doc["title"]
    assert isinstance(doc["detail"], str) and doc["detail"]
    assert isinstance(doc["type"], str) and doc["type"]
    if kind is not None:
        assert doc["type"] == PROBLEM_BASE + kind, doc
    assert "Traceback" not in response.text
    return doc
