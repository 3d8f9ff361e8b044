"""SSE on the plain ASGI path: behind a BaseHTTPMiddleware, under uvicorn's h11 and under hypercorn.

Herald's uvicorn protocol (herald/http/fastwrite.py) is a fast path, not a requirement: wherever
it is absent, or something stands between it and the app, a stream must still deliver a command's
events to its end and notice its client leaving. Each server runs as a real process on loopback,
as a deployment would run it; the same test body runs against each, Herald's own protocol included.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response

from herald.hub import Subscriber
from tests.herald.http.harness import LiveHerald, wait_until
from tests.support.server import HERALD_HTTP, ROOT, HeraldServer
from tests.support.sse import sse_connect

SERVERS = {
    "uvicorn-herald": ["-m", "uvicorn", "app.main:create_app", "--factory", "--http", HERALD_HTTP],
    "uvicorn-h11": ["-m", "uvicorn", "app.main:create_app", "--factory", "--http", "h11"],
    "hypercorn": ["-m", "hypercorn", "app.main:create_app()"],
}


class ServerProcess(HeraldServer):
    """The chat app run by ``python <argv>`` bound to :attr:`port` (uvicorn or hypercorn)."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__({"HERALD_HEARTBEAT": "1"})
        self.argv = argv

    def start(self) -> ServerProcess:
        """Start the process and wait until ``/healthz`` answers."""
        bind = ["--bind", f"127.0.0.1:{self.port}"] if "hypercorn" in self.argv else [
            "--host", "127.0.0.1", "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("HERALD_")}
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, *self.argv, *bind], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1.0):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.argv} did not answer /healthz:\n{self.log()}")


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The chat app served by one of :data:`SERVERS`, stopped after the test."""
    process = ServerProcess(SERVERS[request.param]).start()
    try:
        yield process
    finally:
        process.stop()


async def sse_connections(client: httpx.AsyncClient) -> float:
    """The ``herald_connections{transport="sse"}`` gauge from ``/metrics``."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('herald_connections{transport="sse"}'):
            return float(line.split()[-1])
    return 0.0


async def follow_a_message_through(client: httpx.AsyncClient, room: str,
                                   connections: Callable[[], Awaitable[float]]) -> None:
    """POST a message; its operation's stream ends on the terminal event, the room's stream gets it.

    Then the client leaves the room's stream without a word, and ``connections()`` must drop to 0.
    """
    subscribe_url = (await client.get(f"/chats/{room}")).json()["subscribe_url"]
    async with sse_connect(client, subscribe_url) as room_stream:
        assert room_stream.response.status_code == 200
        assert (await room_stream.next_block()).retry is not None
        posted = await client.post(f"/chats/{room}/messages", json={"author": "ann", "text": "portable"})
        assert posted.status_code == 202, posted.text
        op = posted.json()
        async with sse_connect(client, op["subscribe_url"]) as op_stream:
            assert op_stream.response.status_code == 200
            events = [b.event for b in await op_stream.until_end() if b.is_message]
        assert events == ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]
        delivered = await room_stream.next_message()
        assert delivered.event == "ChatMessageDelivered"
        assert delivered.json()["data"]["text"] == "portable"
        assert await connections() == 1  # the room's stream; the operation's has ended
    async with asyncio.timeout(5):
        while await connections():  # noqa: ASYNC110  (the server's gauge offers no event to await)
            await asyncio.sleep(0.05)


async def test_sse_follows_a_command_to_its_end_and_notices_the_client_leaving(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await follow_a_message_through(client, "portable", lambda: sse_connections(client))
    assert "Traceback" not in server.log()


class PassThrough(BaseHTTPMiddleware):
    """A middleware as many apps have one: it looks at each request and changes nothing."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def add_pass_through(app: Starlette) -> None:
    app.add_middleware(PassThrough)


def streams(herald: LiveHerald) -> list[Subscriber]:
    return [sub for sub in herald.gateway.hub._subscribers if sub.transport == "sse"]


async def test_sse_works_behind_a_base_http_middleware_on_the_plain_path(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    herald = await make_live(prepare=add_pass_through)

    async def connections() -> float:
        # the live stream takes the plain path: the middleware relays its messages from a task of its own
        assert all(sub.direct is None for sub in streams(herald))
        return len(streams(herald))

    await follow_a_message_through(herald.client, "behind", connections)
    await wait_until(lambda: herald.gateway.hub.topic_count() == 0)
