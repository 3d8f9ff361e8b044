"""Herald as a real ``herald serve`` subprocess on a free loopback port, for end-to-end tests.

``HeraldServer(env).start()`` runs ``herald serve --app app.main:create_app`` (as the Procfile
does; ``target=`` serves something else) with the given environment, waits for ``/healthz``, and
:meth:`HeraldServer.stop` ends it with SIGTERM (then SIGKILL if it lingers). Its stdout and stderr
go to a file, so a failing test can show the log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_SECRET = "herald-test-secret-0123456789abcdef"
HERALD_HTTP = "herald.http.fastwrite:HttpToolsProtocol"
"""uvicorn's --http for Herald (``herald serve`` uses it): for tests that run uvicorn in-process."""
HERALD_WS = "herald.http.fastwrite:WebSocketProtocol"
"""uvicorn's --ws for Herald (``herald serve`` uses it), likewise."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HeraldServer:
    """One Herald gateway process."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        target: Sequence[str] = ("--app", "app.main:create_app"),
        # Timeouts
        start_timeout: float = 15.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.port = port or free_port()
        self.target = tuple(target)
        """What ``herald serve`` serves: ``--app module:attr``, ``--domain module:attr`` (repeatable), ``--config``."""
        # HERALD_RATE_LIMIT=0: a test's requests all come from one address, faster than any client would
        # send them; the anonymous default limit has its own test (tests/herald/hardening/test_defaults.py),
        # and a test gets the default back with HERALD_RATE_LIMIT="" (empty means the default).
        self.env = {"HERALD_SECRET": TEST_SECRET, "HERALD_LOG_LEVEL": "info", "HERALD_RATE_LIMIT": "0",
                    **(env or {})}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        log = tempfile.NamedTemporaryFile(prefix=f"herald-{self.port}-", suffix=".log", delete=False)
        log.close()
        self.log_path = Path(log.name)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<port>``."""
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def start(self) -> HeraldServer:
        """Start the process and wait until ``/healthz`` answers; raises with the log if it does not."""
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("HERALD_")}
        env.update(self.env)
        command = [
            sys.executable, "-m", "herald", "serve", *self.target,
            "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"herald exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1.0) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"herald did not answer /healthz within {self.start_timeout}s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; the exit code (``None`` if it was never started)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(self.stop_timeout)

    def __enter__(self) -> HeraldServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
