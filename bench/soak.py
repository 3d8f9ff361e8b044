"""Soak: hold many push connections and a steady flow of operations; watch memory and fds over time.

``python -m bench.soak [--minutes 10] [--connections 2000] [--rate 5] [--broker redis|memory]``

It starts its own Herald gateway (``herald serve``, as the Procfile) on a free loopback port — and,
with ``--broker redis``, its own ``redis-server`` and one ``herald worker`` — opens the
connections (half SSE, half WebSocket, spread over chat rooms), then POSTs chat messages at a
steady rate for the whole run while every connection receives its room's events. Every
``--sample`` seconds it reads the gateway's resident memory (``/proc/<pid>/statm``) and open
file descriptors (``/proc/<pid>/fd``). Growth is the last third's mean against the samples just
after the warm-up (when every connection is open and the rooms' histories are full); it must
stay under 5 %. Results go to ``bench/results/soak-<time>.json`` and ``.md``.

Everything stays on 127.0.0.1, every wait is bounded, and the run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from bench.servers import HOST, ROOT, Managed, RedisServer, free_port, raise_fd_limit, spawn, wait_http

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SECRET = "soak-secret-not-for-production-0123456789"
LIMIT = 5.0
"""Largest growth (percent) of RSS or open fds that passes."""
DELIVERED = b"event: ChatMessageDelivered\n"


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_SIZE


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# Clients --------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the clients saw."""

    connected: int = 0
    open: int = 0
    dropped: int = 0
    reconnected: int = 0
    delivered: int = 0
    posted: int = 0
    post_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, reason: str) -> None:
        """Count a failure by reason."""
        self.errors[reason] = self.errors.get(reason, 0) + 1


class SSEClient(asyncio.Protocol):
    """A raw SSE stream that only counts delivered messages (keeps nothing, so the client stays flat)."""

    def __init__(self, request: bytes, tally: Tally, lost: asyncio.Future[None]) -> None:
        self.request = request
        self.tally = tally
        self.lost = lost
        self.ok = False
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.ok:
            self.ok = data[8:13] == b" 200 "
            if not self.ok:
                self.tally.error("sse status " + data[9:12].decode(errors="replace"))
        chunk = self.tail + data  # a marker may straddle two reads
        self.tally.delivered += chunk.count(DELIVERED)
        self.tail = chunk[-len(DELIVERED) + 1:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def sse_client(port: int, path: str, tally: Tally, stop: asyncio.Event) -> None:
    """Hold one SSE stream until ``stop``, reconnecting (counted) if the server drops it."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    first = True
    while not stop.is_set():
        lost: asyncio.Future[None] = loop.create_future()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(functools.partial(SSEClient, request, tally, lost), HOST, port), 30)
        except (OSError, TimeoutError) as exc:
            tally.error(f"sse connect {type(exc).__name__}")
            await asyncio.sleep(1)
            continue
        tally.connected += first
        tally.reconnected += not first
        tally.open += 1
        first = False
        stopped = asyncio.ensure_future(stop.wait())
        waits: list[asyncio.Future[Any]] = [lost, stopped]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        transport.abort()
        tally.open -= 1
        if not stop.is_set():
            tally.dropped += 1
            await asyncio.sleep(1)


async def ws_client(url: str, tally: Tally, stop: asyncio.Event) -> None:
    """Hold one WebSocket until ``stop`` (pings answered by the library), reconnecting if dropped."""
    first = True
    while not stop.is_set():
        try:
            async with websockets.connect(url, open_timeout=30, max_queue=64) as ws:
                tally.connected += first
                tally.reconnected += not first
                tally.open += 1
                first = False
                reader = asyncio.ensure_future(_count_ws(ws, tally))
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait([reader, stopped], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopped.cancel()
                    reader.cancel()
                    tally.open -= 1
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            tally.error(f"ws {type(exc).__name__}")
        if not stop.is_set():
            tally.dropped += 1
            await asyncio.sleep(1)


async def _count_ws(ws: Any, tally: Tally) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in ws:
            if isinstance(message, str) and '"ChatMessageDelivered"' in message:
                tally.delivered += 1


async def poster(client: httpx.AsyncClient, rooms: list[str], rate: float, tally: Tally, stop: asyncio.Event) -> None:
    """POST one chat message every ``1/rate`` seconds, round-robin over the rooms, until ``stop``."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    n = 0
    while not stop.is_set():
        room = rooms[n % len(rooms)]
        n += 1
        try:
            response = await client.post(f"/chats/{room}/messages", json={"author": "soak", "text": f"m{n}"})
            if response.status_code == 202:
                tally.posted += 1
            else:
                tally.post_errors += 1
                tally.error(f"post {response.status_code}")
        except httpx.HTTPError as exc:
            tally.post_errors += 1
            tally.error(f"post {type(exc).__name__}")
        next_at += interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))


# The run --------------------------------------------------------------------------------------

def growth(values: list[float], warm: int) -> dict[str, float]:
    """Baseline (mean of the first samples after warm-up), end (mean of the last third) and their growth."""
    after = values[warm:] or values
    baseline = statistics.fmean(after[: max(1, min(3, len(after)))])
    end = statistics.fmean(after[-max(1, len(after) // 3):])
    return {"baseline": baseline, "end": end, "max": max(after),
            "growth_percent": round(100.0 * (end - baseline) / baseline, 2) if baseline else 0.0}


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the servers, run the load, sample, and return the report."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("HERALD_")}
    env.update({
        "HERALD_SECRET": SECRET,
        "HERALD_LOG_LEVEL": "warning",
        "HERALD_MAX_CONNECTIONS": str(args.connections + 500),
        # every connection comes from this one address, many with one room's token
        "HERALD_MAX_CONNECTIONS_PER_CLIENT": str(args.connections + 500),
        "HERALD_MAX_CONNECTIONS_PER_TOKEN": str(args.connections + 500),
        # the poster is one address: --rate may exceed the anonymous default of 20 commands per second
        "HERALD_RATE_LIMIT": "0",
        # rooms' histories fill within the warm-up, so a full history is part of the baseline
        "HERALD_HISTORY_SIZE": str(args.history),
        # operations of the memory broker expire within the run (the sweep runs every 30 s)
        "HERALD_OPERATION_TTL": str(args.operation_ttl),
    })
    procs: list[Managed] = []
    redis: RedisServer | None = None
    try:
        if args.broker == "redis":
            redis = RedisServer(workdir).start()
            env["REDIS_URL"] = redis.url
            procs.append(spawn("worker", [sys.executable, "-m", "herald", "worker", "app.chat:chat"], workdir, env=env))
        gateway = spawn("gateway", [
            sys.executable, "-m", "herald", "serve", "--app", "app.main:create_app",
            "--host", HOST, "--port", str(port), "--no-access-log",
        ], workdir, env=env)
        procs.append(gateway)
        wait_http(f"http://{HOST}:{port}/readyz", procs)
        report = await _drive(args, port, gateway.pid)
        report["server_log_tail"] = gateway.log_tail(5).splitlines()
        return report
    finally:
        for proc in reversed(procs):
            proc.stop()
        if redis is not None:
            redis.stop()


async def _drive(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    tally = Tally()
    stop = asyncio.Event()
    rooms = [f"soak-{i}" for i in range(args.rooms)]
    base = f"http://{HOST}:{port}"
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        urls = {room: (await client.get(f"/chats/{room}")).json() for room in rooms}
        tasks: list[asyncio.Task[None]] = []
        for n in range(args.connections):
            room = urls[rooms[n % len(rooms)]]
            if n % 2 == 0:
                tasks.append(asyncio.create_task(sse_client(port, room["subscribe_url"], tally, stop)))
            else:
                tasks.append(asyncio.create_task(ws_client(room["websocket_url"], tally, stop)))
            if n % 100 == 99:
                await asyncio.sleep(0.05)  # a steady ramp, not one burst of 2,000 handshakes
        for _ in range(1200):  # up to 120 s for every connection to be open
            if tally.connected >= args.connections:
                break
            await asyncio.sleep(0.1)
        opened = time.monotonic() - started
        post_task = asyncio.create_task(poster(client, rooms, args.rate, tally, stop))
        run_for = args.minutes * 60.0
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            samples.append({"t": round(elapsed, 1), "rss": rss(pid), "fds": open_fds(pid),
                            "open": tally.open,
                            "delivered": tally.delivered, "posted": tally.posted})
            if elapsed >= run_for:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(args.sample), min(args.sample, run_for - elapsed) + 1)
        stop.set()
        await asyncio.wait([post_task, *tasks], timeout=30)
    warm = sum(1 for s in samples if s["t"] < args.warmup)
    mem = growth([s["rss"] for s in samples], warm)
    fds = growth([s["fds"] for s in samples], warm)
    expected = tally.posted * args.connections / len(rooms)
    return {
        "scenario": "soak",
        "broker": args.broker,
        "minutes": args.minutes,
        "connections": args.connections,
        "rooms": len(rooms),
        "rate_per_s": args.rate,
        "warmup_s": args.warmup,
        "open_seconds": round(opened, 1),
        "rss": mem,
        "fds": fds,
        "pass": mem["growth_percent"] < LIMIT and fds["growth_percent"] < LIMIT,
        "clients": {"connected": tally.connected, "dropped": tally.dropped, "reconnected": tally.reconnected,
                    "posted": tally.posted, "post_errors": tally.post_errors, "delivered": tally.delivered,
                    "delivered_ratio": round(tally.delivered / expected, 4) if expected else None,
                    "errors": tally.errors},
        "samples": samples,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown table."""
    mib = 1024 * 1024
    r, f, c = report["rss"], report["fds"], report["clients"]
    lines = [
        f"# Soak: {report['minutes']} min, {report['connections']} connections, {report['rate_per_s']} ops/s "
        f"({report['broker']} broker) — {'PASS' if report['pass'] else 'FAIL'}",
        "",
        "| figure | after warm-up | end (last third) | max | growth |",
        "| --- | --- | --- | --- | --- |",
        f"| gateway RSS (MiB) | {r['baseline'] / mib:.1f} | {r['end'] / mib:.1f} | {r['max'] / mib:.1f} "
        f"| {r['growth_percent']} % |",
        f"| gateway open fds | {f['baseline']:.0f} | {f['end']:.0f} | {f['max']:.0f} | {f['growth_percent']} % |",
        "",
        f"Operations posted: {c['posted']} ({c['post_errors']} errors); messages delivered to connections: "
        f"{c['delivered']} ({c['delivered_ratio']} of expected); dropped connections: {c['dropped']}, "
        f"reconnected: {c['reconnected']}; connections opened in {report['open_seconds']} s.",
        "",
        "| t (s) | RSS (MiB) | fds | open connections | delivered |",
        "| --- | --- | --- | --- | --- |",
    ]
    step = max(1, len(report["samples"]) // 20)
    for s in report["samples"][::step]:
        lines.append(f"| {s['t']} | {s['rss'] / mib:.1f} | {s['fds']} | {s['open']} | {s['delivered']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the soak, write the JSON and markdown reports; exit 1 if growth is too high."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=5.0, help="operations (chat messages) per second")
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=90.0, help="seconds of load before the baseline")
    parser.add_argument("--history", type=int, default=20, help="HERALD_HISTORY_SIZE of the gateway")
    parser.add_argument("--operation-ttl", type=int, default=60, help="HERALD_OPERATION_TTL of the gateway")
    parser.add_argument("--broker", choices=["redis", "memory"], default="redis")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    raise_fd_limit()  # both ends of 2,000 connections live on this machine
    with tempfile.TemporaryDirectory(prefix="herald-soak-") as tmp:
        report = asyncio.run(soak(args, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / time.strftime("soak-%Y%m%dT%H%M%S")
    stem.with_suffix(".json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
