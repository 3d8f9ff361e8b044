"""The servers under test, each started fresh for a scenario, and the /proc readings of their cost.

Every server here listens on a free loopback port, keeps its files in a temporary directory and is
stopped by its own process group id. Nothing touches a Redis the bench did not start.

* :class:`RedisServer`: the bench's own ``redis-server`` (no persistence), one per scenario.
* :class:`HeraldServer`: the gateway (``herald serve``, one process) plus one ``herald worker``.
* :class:`NaiveServer`: :mod:`bench.baselines.naive` under the same uvicorn flags, plus its worker.
* :class:`NchanServer`: nginx with ``ngx_nchan_module``, one worker process, Redis storage.

:class:`ProcTree` reads the resident memory and CPU time of a process and all its descendants.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SECRET = "bench-secret-not-for-production-0123456789"
"""``HERALD_SECRET`` and ``HERALD_PUBLISH_JWT_SECRET`` of every Herald the bench starts; the load generator signs
subscribe tokens, and the publisher its publisher token, with it."""


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); returns the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# /proc ---------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


@dataclass(frozen=True, slots=True)
class Usage:
    """Resident memory (bytes) and CPU time (seconds) of a process tree at one moment."""

    rss: int
    cpu: float
    processes: int


class ProcTree:
    """A root process and its descendants, read from /proc."""

    def __init__(self, *pids: int) -> None:
        self.roots = pids

    def pids(self) -> list[int]:
        """Every live process of the tree (the roots and all their descendants)."""
        seen: list[int] = []
        stack = list(self.roots)
        while stack:
            pid = stack.pop()
            if pid in seen or not os.path.exists(f"/proc/{pid}"):
                continue
            seen.append(pid)
            stack.extend(_children(pid))
        return seen

    def usage(self) -> Usage:
        """RSS summed over the tree, and user + system CPU time of every process in it."""
        rss = 0
        cpu_ticks = 0
        pids = self.pids()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm") as fh:
                    rss += int(fh.read().split()[1]) * PAGE_SIZE
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15
                cpu_ticks += int(fields[11]) + int(fields[12])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
        return Usage(rss=rss, cpu=cpu_ticks / CLOCK_TICKS, processes=len(pids))


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


# Processes -----------------------------------------------------------------------------------

@dataclass
class Managed:
    """A process the bench started in its own session, stopped through its process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the group, then SIGKILL it if it does not go within ``timeout`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # a worker process of the group may outlive its leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def spawn(name: str, argv: list[str], workdir: Path, *, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> Managed:
    """Start ``argv`` in a new session with stdout and stderr in ``workdir/name.log``."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env, start_new_session=True)
    return Managed(name, proc, log_path)


def wait_http(url: str, managed: list[Managed], *, timeout: float = 20.0, status: int = 200) -> None:
    """Poll ``url`` until it answers ``status``; raise with the servers' logs if it never does."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for m in managed:
            if not m.alive():
                raise RuntimeError(f"{m.name} exited with {m.proc.returncode}:\n{m.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == status:
                    return
                last = resp.status
        except urllib.error.HTTPError as exc:
            last = exc.code
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s (last: {last}):\n"
                       + "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in managed))


# Servers -------------------------------------------------------------------------------------

class RedisServer:
    """The bench's own redis-server on a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.process: Managed | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING."""
        self.process = spawn("redis", [
            "redis-server", "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--maxclients", "19000", "--tcp-backlog", "4096",
            "--protected-mode", "yes", "--loglevel", "warning",
        ], self.workdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"redis-server exited:\n{self.process.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING")

    def tree(self) -> ProcTree:
        """The redis-server process."""
        assert self.process is not None
        return ProcTree(self.process.pid)

    def stop(self) -> None:
        """Stop it."""
        if self.process is not None:
            self.process.stop()


@dataclass
class Target:
    """A server under test: its processes, where it listens and how its URLs are built."""

    name: str
    port: int
    redis: RedisServer
    processes: list[Managed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def tree(self) -> ProcTree:
        """Every process of the server (not Redis)."""
        return ProcTree(*(p.pid for p in self.processes))

    def stop(self) -> None:
        """Stop every process of the server."""
        for p in reversed(self.processes):
            p.stop()

    def check_alive(self) -> None:
        """Raise if a process of the server died."""
        for p in self.processes:
            if not p.alive():
                raise RuntimeError(f"{self.name}: {p.name} exited with {p.proc.returncode}:\n{p.log_tail()}")


def _ready(target: Target, url: str) -> Target:
    """Wait for ``url`` to answer 200; stop the target's processes if it never does."""
    try:
        wait_http(url, target.processes)
    except BaseException:
        target.stop()
        raise
    return target


def herald_uses_redis() -> bool:
    """Whether this tree has the Redis broker yet (until it lands, Herald runs on the memory broker)."""
    return (ROOT / "herald" / "broker" / "redis.py").exists()


HERALD_HTTP = "herald.http.fastwrite:HttpToolsProtocol"
UVICORN_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--backlog", "4096", "--no-access-log",
                 "--log-level", "warning", "--timeout-graceful-shutdown", "1"]


def start_herald(workdir: Path, redis: RedisServer, *, extra_env: dict[str, str] | None = None) -> Target:
    """Herald on the bench's Redis: one gateway process and one worker process."""
    port = free_port()
    env = {**os.environ, "HERALD_SECRET": SECRET, "HERALD_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
           "HERALD_HEARTBEAT": "15", "HERALD_WORKER_CONCURRENCY": "32",
           # every command of the load generator comes from one address, far faster than the anonymous
           # default of 20 per second per client lets one client send: the benchmark measures Herald, not it
           "HERALD_RATE_LIMIT": "0",
           # and all its connections, many opened with one room's token: no cap per client or per token,
           # none on long polls, no message rate on a WebSocket
           "HERALD_MAX_CONNECTIONS_PER_CLIENT": "1000000", "HERALD_MAX_CONNECTIONS_PER_TOKEN": "1000000",
           "HERALD_MAX_LONG_POLLS": "1000000", "HERALD_WS_RATE": "0",
           # scenario P publishes through POST /topics/{topic}/events as fast as it goes: no rate limit
           "HERALD_PUBLISH_JWT_SECRET": SECRET, "HERALD_PUBLISH_RATE": "0",
           # and through the Mercure hub (bench/mercure.py): the publisher signs with SECRET, subscribers are anonymous
           "HERALD_MERCURE_PUBLISHER_JWT_KEY": SECRET, "HERALD_MERCURE_ANONYMOUS": "1", **(extra_env or {})}
    env.pop("REDIS_URL", None)
    target = Target("herald", port, redis)
    if herald_uses_redis():
        env["REDIS_URL"] = redis.url
        env["HERALD_EMBEDDED_WORKER"] = "0"
    else:
        target.notes.append("memory broker, embedded worker (app/broker/redis.py not in this tree yet)")
    # `herald serve`, as the Procfile runs it: uvloop, Herald's own httptools protocol (HERALD_HTTP) and
    # websockets-sansio built in; the uvicorn flags the baselines get that it does not set by itself are
    # passed (its log level follows HERALD_LOG_LEVEL)
    target.processes.append(spawn("herald-gateway", [
        PYTHON, "-m", "herald", "serve", "--app", "app.main:create_app", "--host", HOST, "--port", str(port),
        "--backlog", "4096", "--no-access-log", "--timeout-graceful-shutdown", "1",
    ], workdir, env=env))
    if herald_uses_redis():
        target.processes.append(spawn("herald-worker", [PYTHON, "-m", "herald", "worker", "app.chat:chat"],
                                      workdir, env=env))
    return _ready(target, f"http://{HOST}:{port}/readyz")


def start_naive(workdir: Path, redis: RedisServer, *, worker: bool = False) -> Target:
    """The naive baseline (starlette + sse-starlette, one Redis pub/sub per connection), and its worker."""
    port = free_port()
    env = {**os.environ, "NAIVE_REDIS_URL": redis.url, "PYTHONUNBUFFERED": "1"}
    target = Target("naive", port, redis)
    target.processes.append(spawn("naive-gateway", [
        PYTHON, "-m", "uvicorn", "bench.baselines.naive:create_app", "--factory", "--host", HOST,
        "--port", str(port), "--ws", "websockets-sansio", *UVICORN_FLAGS,
    ], workdir, env=env))
    if worker:
        target.processes.append(spawn("naive-worker", [PYTHON, "-m", "bench.baselines.naive", "worker"],
                                      workdir, env=env))
    return _ready(target, f"http://{HOST}:{port}/healthz")


def nchan_available() -> bool:
    """Whether nginx and Debian's nchan module are installed."""
    return NCHAN_MODULE.exists() and shutil.which("nginx") is not None


NGINX_CONF = """\
load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections {connections}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256M;
    nchan_message_buffer_length 1000;
    nchan_message_timeout 1h;
    upstream bench_redis {{ nchan_redis_server {redis_url}; }}
    server {{
        listen {host}:{port} backlog=4096;
        location = /healthz {{ return 200 "ok"; }}
        location ~ ^/sub/(.+)$ {{
            nchan_subscriber websocket eventsource;
            nchan_channel_id $1;
            nchan_eventsource_ping_interval 15;
            nchan_eventsource_ping_comment "";
            {storage}
        }}
        location ~ ^/pub/(.+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
            {storage}
        }}
    }}
}}
"""


def start_nchan(workdir: Path, redis: RedisServer, *, use_redis: bool = True) -> Target:
    """nginx + nchan, one worker process, its channels stored in the bench's Redis."""
    port = free_port()
    ndir = workdir / "nginx"
    ndir.mkdir(exist_ok=True)
    nofile = raise_fd_limit()
    conf = NGINX_CONF.format(
        module=NCHAN_MODULE, dir=ndir, host=HOST, port=port, redis_url=f"redis://{HOST}:{redis.port}",
        nofile=nofile, connections=max(1024, nofile - 64),
        storage="nchan_redis_pass bench_redis;" if use_redis else "",
    )
    (ndir / "nginx.conf").write_text(conf)
    target = Target("nchan", port, redis)
    if not use_redis:
        target.notes.append("nchan with memory storage, not Redis")
    target.processes.append(spawn("nchan", ["nginx", "-p", str(ndir), "-c", str(ndir / "nginx.conf")], ndir))
    _ready(target, f"http://{HOST}:{port}/healthz")
    if use_redis:
        _nchan_storage_ready(target)
    return target


def _nchan_storage_ready(target: Target, timeout: float = 20.0) -> None:
    """Wait until nchan's channels answer (it connects to Redis after it starts, and answers 503 until then).

    Subscribers and publishers that came before were refused with 503, so a scenario found no event delivered.
    """
    url = f"http://{HOST}:{target.port}/pub/bench-ready-probe"  # GET: the channel's info, 404 while it has none
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                last = resp.status
        except urllib.error.HTTPError as exc:
            last = exc.code
        except OSError as exc:
            last = exc
        if last in (200, 404):
            return
        time.sleep(0.05)
    target.stop()
    raise RuntimeError(f"nchan's Redis storage not ready after {timeout}s (last: {last})")


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory for one scenario's server files, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
