"""What the command proxy's tests share: the upstream process, a config file for it, and a gateway serving one.

* :class:`Upstream` — :mod:`tests.herald.proxy.upstream` under uvicorn, a process of its own on a
  free loopback port; :meth:`Upstream.log` is every request it got.
* :func:`config_text` — a ``herald.toml`` whose commands go to that upstream's endpoints.
* :func:`gateway` — Herald serving such a config in this process (memory broker, embedded worker),
  on a real port, since the upstream calls the callback API back over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from herald.proxy.config import parse_config
from tests.herald.http.harness import LiveHerald, served
from tests.support.server import ROOT, free_port

COMMANDS = {
    # path on the gateway → (upstream endpoint, extra TOML lines)
    "/fast": ("/fast", ""),
    "/slow": ("/slow", ""),
    "/slow-failing": ("/slow?fail=1", ""),
    "/failing": ("/failing", "backoff = { initial = 0.4, max = 2 }"),
    "/busy": ("/busy", "backoff = { initial = 0.05, max = 3 }"),
    "/refusing": ("/refusing", ""),
    "/refusing-plain": ("/refusing?plain=1", ""),
    "/hanging": ("/hanging", "timeout = 0.5\nattempts = 2\nbackoff = 0.1"),
    "/sticky": ("/sticky", "timeout = 30"),
    "/waiting": ("/waiting", ""),
    "/declared-cancel/{job}": ("/waiting?quiet=1", 'cancel = "{upstream}/jobs/{job}"'),
}


def config_text(upstream: str, *, attempts: int = 5) -> str:
    """A config file whose commands forward to the test upstream at ``upstream`` (``http://127.0.0.1:N``)."""
    parts = ['name = "things"\n']
    for index, (path, (target, extra)) in enumerate(COMMANDS.items()):
        event = "Thing" + "".join(w.capitalize() for w in path.strip("/").split("/")[0].split("-")) + "Requested"
        lines = [
            "[[command]]",
            f'path = "{path}"',
            f'event = "{event}"',
            f'upstream = "{upstream}{target}"',
            f"attempts = {attempts}",
            'topics = ["things/{operation_id}"]',
            'schema = { type = "object", properties = { size = { type = "integer" } } }',
            extra.replace("{upstream}", upstream),
        ]
        if "attempts" in extra:
            lines.remove(f"attempts = {attempts}")
        parts.append("\n".join(line for line in lines if line) + f"\n# entry {index + 1}\n")
    parts.append(f'[[route]]\npath = "/things/{{thing}}"\nupstream = "{upstream}/things/{{thing}}"\ntimeout = 2\n')
    parts.append('[[topic]]\npattern = "things/{id}"\nsubscribe = "token"\n')
    return "\n".join(parts)


class Upstream:
    """The test upstream, a uvicorn process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="upstream-", suffix=".log", delete=False)
        log.close()
        self.log_path = Path(log.name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        """Start it and wait until it answers."""
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "tests.herald.proxy.upstream:app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "warning", "--timeout-graceful-shutdown", "1"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the upstream exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/_log", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the upstream did not start")

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every request the upstream got (to ``path``, if given), in arrival order."""
        with urllib.request.urlopen(self.url + "/_log", timeout=5) as response:
            entries: list[dict[str, Any]] = orjson.loads(response.read())
        return [e for e in entries if path is None or e["path"] == path]

    async def arequests(self, path: str | None = None) -> list[dict[str, Any]]:
        """:meth:`requests`, off the event loop."""
        return await asyncio.to_thread(self.requests, path)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.asynccontextmanager
async def gateway(text: str, **overrides: Any) -> AsyncIterator[LiveHerald]:
    """Herald serving the config ``text`` on a free loopback port (memory broker, embedded worker)."""
    async with served(domains=[parse_config(text)], callback_to_self=True, **overrides) as herald:
        yield herald


async def wait_ended(client: httpx.AsyncClient, operation_id: str, *, timeout: float = 15.0) -> dict[str, Any]:
    """Long-poll the operation until it has ended (or stays ``running`` handed off, after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/operations/{operation_id}", params={"view": "status", "wait": "5"})
            assert response.status_code == 200, response.text
            doc: dict[str, Any] = response.json()
            if doc["status"] in ("succeeded", "failed", "canceled"):
                return doc


async def events_of(client: httpx.AsyncClient, body: dict[str, Any], *, timeout: float = 15.0,
                    until: str | None = None) -> list[dict[str, Any]]:
    """Every event of an operation's SSE stream (``body``: its 202), read to the stream's end.

    With ``until``, read only until the first event of that type has come (the last of those returned).
    """
    out: list[dict[str, Any]] = []
    buffer = b""
    async with asyncio.timeout(timeout):
        async with client.stream("GET", body["subscribe_url"], headers={"Accept": "text/event-stream"},
                                 timeout=httpx.Timeout(5.0, read=None)) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    for line in block.split(b"\n"):
                        if line.startswith(b"data: "):
                            out.append(orjson.loads(line[6:]))
                            if until is not None and out[-1]["type"] == until:
                                return out
    return out


async def first_event(client: httpx.AsyncClient, body: dict[str, Any], type: str, *,
                      timeout: float = 15.0) -> dict[str, Any]:
    """The first event of ``type`` on an operation's SSE stream (``body``: its 202), as soon as it is there."""
    events = await events_of(client, body, timeout=timeout, until=type)
    if not events or events[-1]["type"] != type:
        raise AssertionError(f"the stream ended without a {type} event")
    return events[-1]

