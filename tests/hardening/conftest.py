"""Fixtures for the hardening tests: real uvicorn subprocesses on loopback, started per need."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from unittest import mock

import jwt
import pytest

from tests.support.server import HeraldServer

JWT_SECRET = "hardening-jwt-secret-0123456789abcdef"


def bearer(subject: str, *, secret: str = JWT_SECRET, ttl: int = 300, **claims: object) -> dict[str, str]:
    """An ``Authorization`` header with an HS256 JWT for ``subject``."""
    now = int(time.time())
    token = jwt.encode({"sub": subject, "iat": now, "exp": now + ttl, **claims}, secret, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


class AccessLoggedServer(HeraldServer):
    """A :class:`HeraldServer` whose uvicorn access log is on, to check what it writes."""

    def start(self) -> HeraldServer:
        """Start with uvicorn's access log enabled (the shared helper always passes ``--no-access-log``)."""
        original = subprocess.Popen

        def popen(command: list[str], *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            return original([c for c in command if c != "--no-access-log"], *args, **kwargs)

        with mock.patch.object(subprocess, "Popen", popen):
            return super().start()


@pytest.fixture
def herald() -> Iterator[Callable[..., HeraldServer]]:
    """Start Herald subprocesses with the given environment; all are stopped after the test."""
    started: list[HeraldServer] = []

    def start(env: Mapping[str, str] | None = None, *, access_log: bool = False) -> HeraldServer:
        server = (AccessLoggedServer if access_log else HeraldServer)(env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
