"""A private ``redis-server`` on a free loopback port, for tests that need a real Redis.

``RedisServer().start()`` runs ``redis-server`` bound to 127.0.0.1 with snapshots off and
its own temporary directory, and waits until it answers PING. :meth:`RedisServer.stop`
(SIGTERM), :meth:`RedisServer.kill` (SIGKILL) and :meth:`RedisServer.restart` (same port,
same directory, so an append-only file survives) let a test take Redis away and bring it
back. Every wait is bounded. It never touches a Redis it did not start.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process owned by the test session (or by one test)."""

    def __init__(self, *, appendonly: bool = False, startup_timeout: float = 10.0) -> None:
        self.appendonly = appendonly
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="herald-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, *, password: str | None = None) -> str:
        """The ``redis://`` URL of database ``db`` on this server."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0, *, password: str | None = None) -> redis.Redis:
        """A synchronous client for assertions and set-up (not the code under test)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=password, socket_timeout=5,
                           protocol=2)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, *extra_args: str) -> RedisServer:
        """Start redis-server (with ``extra_args`` appended) and wait until it answers."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        args = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--save", "",
            "--logfile", str(self.dir / "redis.log"),
            "--appendonly", "yes" if self.appendonly else "no",
            # every write on disk before the reply: a SIGKILL in a test must not lose acknowledged data
            "--appendfsync", "always",
            *extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_answering()
        return self

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"redis-server exited at start-up:\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer within {self.startup_timeout}s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        # -NOAUTH: up and serving, it only wants a password (a test may start it with --requirepass)
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown) and wait; SIGKILL if it lingers."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: Redis vanishes as in a crash."""
        self._end(signal.SIGKILL, timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def restart(self, *extra_args: str) -> RedisServer:
        """Stop if running, then start again on the same port with the same directory."""
        self.stop()
        return self.start(*extra_args)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start() if not self.running else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
