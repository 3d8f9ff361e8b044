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


class FlaggedServer(HeraldServer):
    """A :class:`HeraldServer` started with other uvicorn flags: its access log on, or extra options."""

    def __init__(self, env: Mapping[str, str] | None = None, *, access_log: bool = False,
                 uvicorn_args: tuple[str, ...] = ()) -> None:
        super().__init__(env)
        self.access_log = access_log
        self.uvicorn_args = uvicorn_args

    def start(self) -> HeraldServer:
        """Start with the flags (the shared helper's command line is fixed, so it is edited on the way)."""
        original = subprocess.Popen

        def popen(command: list[str], *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            if self.access_log:
                command = [c for c in command if c != "--no-access-log"]
            return original([*command, *self.uvicorn_args], *args, **kwargs)

        with mock.patch.object(subprocess, "Popen", popen):
            return super().start()


@pytest.fixture
def herald() -> Iterator[Callable[..., HeraldServer]]:
    """Start Herald subprocesses with the given environment; all are stopped after the test."""
    started: list[HeraldServer] = []

    def start(env: Mapping[str, str] | None = None, *, access_log: bool = False,
              uvicorn_args: tuple[str, ...] = ()) -> HeraldServer:
        server = FlaggedServer(env, access_log=access_log, uvicorn_args=uvicorn_args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
