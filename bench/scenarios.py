"""Scenarios A-E of issue 5 and P of issue 15, each run against one freshly started target.

A. idle capacity: N SSE subscribers on distinct topics: server KiB per connection, seconds to
   connect them all, failures. B. fan-out: subscribers on one topic, events at a fixed rate:
   delivered / expected, lost, duplicated, out of order, latency. C. many 1:1 topics: one event
   per topic as fast as the publisher goes: deliveries per second, latency. D. end to end:
   POST → 202 → worker → correlated event over SSE at stepped rates. E. A and C over WebSocket.

Latency is arrival - publish on one clock (``time.time_ns``): the publisher stamps each event's
data, the subscriber stamps the bytes as they arrive. In D the start is the moment the POST was
scheduled (open loop, so a slow server cannot hide its queueing), the end the arrival of the
event carrying the operation's correlation id on the room's SSE stream. P. publishing over HTTP:
events/s through Herald's ``POST /topics/{topic}/events`` (in batches, and one per request) beside
nchan's ``POST /pub/{channel}``, each topic followed by one SSE subscriber that must get every event.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import (
    Group,
    HTTPPool,
    OpenResult,
    SSESubscriber,
    Subscriber,
    WSSubscriber,
    close_all,
    envelope,
    latency_summary,
    open_subscribers,
    sse_messages,
    sse_request,
    ws_messages,
    ws_request,
)
from bench.mercure import mercure_throughput
from bench.proxy import request_reply, start_direct, start_proxied
from bench.saturation import saturation
from bench.servers import HOST, PYTHON, ROOT, SECRET, RedisServer, Target
from bench.targets import TargetKind

MiB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is in one mode of the bench."""

    a_sizes: tuple[int, ...]
    b_subscribers: int
    b_events: int
    b_rate: float
    c_subscribers: int
    d_rooms: int
    d_rates: tuple[int, ...]
    d_step_seconds: float
    e_sizes: tuple[int, ...]
    e_c_subscribers: int
    p_events: int = 10000  # P: events published in batches of p_batch (nchan: one per request, it has no batch)
    p_single_events: int = 2000  # P: events published one per request
    p_batch: int = 50
    p_topics: int = 4  # one publisher connection per topic, each topic followed by one SSE subscriber
    c_rate: float = 5000.0  # the paced variant of C: the target rate
    c_rounds: int = 5  # C and E-C as fast as it goes: bursts of one event per topic; the median round counts
    r_seconds: float = 5.0  # R: seconds of closed-loop commands per variant
    r_clients: int = 32  # R: connections sending commands, each one at a time
    s_commands: int = 3000  # S: commands as fast as they go, each to a room with its own SSE subscriber
    s_concurrency: int = 64  # S: keep-alive connections sending them, each one at a time
    connect_deadline: float = 25.0  # A and E: connections not made by then count as failed (keeps the run bounded)
    settle_seconds: float = 1.0  # after connecting, before memory is read
    quiet_seconds: float = 1.0  # no bytes for this long: every subscriber has all it will get


FULL = Sizes(a_sizes=(1000, 10000), b_subscribers=1000, b_events=200, b_rate=50.0, c_subscribers=2000,
             d_rooms=20, d_rates=(100, 500, 1000, 2000, 3000, 4000, 5000), d_step_seconds=2.0,
             e_sizes=(1000, 10000), e_c_subscribers=2000)
QUICK = Sizes(a_sizes=(200, 1000), b_subscribers=200, b_events=50, b_rate=50.0, c_subscribers=500,
              d_rooms=10, d_rates=(50, 100, 250), d_step_seconds=1.5, e_sizes=(1000,), e_c_subscribers=500,
              p_events=5000, p_single_events=1000, r_seconds=3.0, s_commands=1000)
TINY = Sizes(a_sizes=(20,), b_subscribers=20, b_events=20, b_rate=50.0, c_subscribers=20,
             d_rooms=4, d_rates=(20,), d_step_seconds=1.0, e_sizes=(20,), e_c_subscribers=20,
             settle_seconds=0.2, quiet_seconds=0.3, c_rounds=2, p_events=200, p_single_events=40,
             r_seconds=1.0, r_clients=4, s_commands=20, s_concurrency=4)


@dataclass
class Case:
    """One scenario variant: a name, whether it needs commands (a worker), and its coroutine."""

    scenario: str
    variant: str
    run: Callable[[TargetKind, Target], Awaitable[dict[str, Any]]]
    commands: bool = False
    publishes: bool = False  # published to over HTTP: only for targets with a publish API
    notes: list[str] = field(default_factory=list)
    start: Callable[[Path, RedisServer], Target] | None = None
    """Starts the case's own server (Herald with another domain or config) instead of the target's usual one."""
    only: str | None = None
    """The one target the case is for (scenario R compares two Herald setups), or ``None`` for every target."""


# Helpers -------------------------------------------------------------------------------------

def _factories(kind: TargetKind, port: int, paths: list[str], transport: str) -> list[Callable[[Group], Subscriber]]:
    hostport = f"{HOST}:{port}"
    if transport == "sse":
        return [functools.partial(SSESubscriber, sse_request(p, hostport)) for p in paths]
    return [functools.partial(WSSubscriber, ws_request(p, hostport), ready_on_message=kind.ws_ready_on_message)
            for p in paths]


def _paths(kind: TargetKind, topics: list[str], transport: str) -> list[str]:
    build = kind.sse_path if transport == "sse" else kind.ws_path
    return [build(t) for t in topics]


async def _open(kind: TargetKind, target: Target, topics: list[str], transport: str) -> OpenResult:
    return await open_subscribers(HOST, target.port, _factories(kind, target.port, _paths(kind, topics, transport),
                                                                transport))


async def quiesce(group: Group, *, quiet: float = 0.5, cap: float = 10.0) -> None:
    """Wait until no subscriber has received anything for ``quiet`` seconds (at most ``cap``)."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        if time.time_ns() - group.last_rx > quiet * 1e9:
            return
        await asyncio.sleep(0.05)


def _messages(sub: Subscriber) -> list[Any]:
    if isinstance(sub, WSSubscriber):
        return ws_messages(sub.frames)
    return sse_messages(sub.chunks)[1]


def alive(subs: list[Subscriber]) -> int:
    """Subscribers that got ready and are still connected."""
    return sum(1 for s in subs if s.ready_at and not s.lost_at)


@dataclass
class Deliveries:
    """What the subscribers of B and C received of the bench's ticks."""

    delivered: int = 0
    unique: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_arrival_ns: int = 0
    by_seq: dict[int, list[int]] = field(default_factory=dict)  # seq -> [deliveries, last arrival ns]


def count_ticks(subs: list[Subscriber]) -> tuple[Deliveries, list[set[int]]]:
    """Parse every subscriber's bytes: the ticks each received, in order, and their latencies."""
    out = Deliveries()
    seen_per_sub: list[set[int]] = []
    for sub in subs:
        seen: set[int] = set()
        prev = -1
        for message in _messages(sub):
            env = envelope(message.json())
            if env is None or env.get("type") != "bench.tick":
                continue
            data = env["data"]
            seq = data["seq"]
            if seq < 0:  # a warm-up event, sent before the measurement
                continue
            out.delivered += 1
            out.latencies_ms.append((message.arrived_ns - data["t"]) / 1e6)
            out.last_arrival_ns = max(out.last_arrival_ns, message.arrived_ns)
            tally = out.by_seq.setdefault(seq, [0, 0])
            tally[0] += 1
            tally[1] = max(tally[1], message.arrived_ns)
            if seq in seen:
                out.duplicated += 1
            else:
                seen.add(seq)
            if seq < prev:
                out.out_of_order += 1
            prev = max(prev, seq)
        out.unique += len(seen)
        seen_per_sub.append(seen)
    return out, seen_per_sub


class Publisher:
    """``python -m bench.publisher`` as a child process: started, told to go, read back."""

    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it is connected."""
        err = open(self.workdir / "publisher.log", "ab")  # noqa: ASYNC230 - a local file, opened once
        try:
            self.proc = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "bench.publisher", cwd=ROOT,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True)
        finally:
            err.close()
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(self.spec) + b"\n")  # the spec can be too long for argv
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"publisher did not start: {line!r}\n{self._log()}")

    def go(self) -> None:
        """Let it publish."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def result(self, timeout: float,
                     between: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Its statistics, once it is done (killed after ``timeout`` seconds).

        Between rounds (``round {json}`` lines) it awaits ``between`` and then lets it go on.
        """
        assert self.proc is not None and self.proc.stdout is not None
        end = time.monotonic() + timeout
        try:
            while True:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, end - time.monotonic()))
                if not line.startswith(b"round "):
                    break
                if between is not None:
                    await between(orjson.loads(line[len(b"round "):]))
                self.go()
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            raise
        if not line:
            raise RuntimeError(f"publisher failed:\n{self._log()}")
        stats: dict[str, Any] = orjson.loads(line)
        return stats

    def _log(self) -> str:
        return (self.workdir / "publisher.log").read_text(errors="replace")[-3000:]


def publisher_spec(kind: TargetKind, target: Target, **spec: Any) -> dict[str, Any]:
    """The publisher's spec for ``kind``."""
    return {"kind": kind.name, "redis_url": target.redis.url, "http_port": target.port, **spec}


async def publish_and_wait(target: Target, group: Group, spec: dict[str, Any], workdir: Path, *,
                           quiet: float) -> tuple[dict[str, Any], float]:
    """Run the publisher, then wait until the subscribers are quiet; its statistics and the server's CPU seconds.

    Between the rounds of a burst, it waits until the subscribers are quiet, so rounds do not overlap.
    """
    publisher = Publisher(spec, workdir)
    await publisher.start()
    await asyncio.sleep(quiet / 2)
    usage0, redis0, ours0 = target.tree().usage(), target.redis.tree().usage(), time.process_time()
    publisher.go()

    async def between(_: dict[str, Any]) -> None:
        await quiesce(group, quiet=min(quiet, 0.3), cap=10)

    stats = await publisher.result(spec["max_seconds"] + 30, between)
    await quiesce(group, quiet=quiet, cap=10)
    usage1, redis1, ours1 = target.tree().usage(), target.redis.tree().usage(), time.process_time()
    target.check_alive()
    # the other parties' CPU over the same window: Redis, and this process (the subscribers' receive loop)
    stats["redis_cpu_s"], stats["loadgen_cpu_s"] = redis1.cpu - redis0.cpu, ours1 - ours0
    return stats, usage1.cpu - usage0.cpu


def _mib(n: int) -> float:
    return round(n / MiB, 1)


# A and E-A: idle capacity ---------------------------------------------------------------------

async def idle_capacity(kind: TargetKind, target: Target, *, n: int, transport: str,
                        settle: float = 1.0, deadline: float = 25.0) -> dict[str, Any]:
    """Open ``n`` subscribers on distinct topics and weigh what they cost the server."""
    topics = [f"bench-a-{i}" for i in range(n)]
    factories = _factories(kind, target.port, _paths(kind, topics, transport), transport)
    gc.collect()
    await asyncio.sleep(settle / 2)
    tree, redis_tree = target.tree(), target.redis.tree()
    before, redis_before = tree.usage(), redis_tree.usage()
    opened = await open_subscribers(HOST, target.port, factories, deadline=deadline)
    await asyncio.sleep(settle)
    after, redis_after = tree.usage(), redis_tree.usage()
    target.check_alive()
    up = alive(opened.subscribers)
    close_all(opened.subscribers)
    return {
        "subscribers": n,
        "connected": up,
        "failed": n - up,
        "errors": opened.group.errors,
        "refusals": opened.group.samples,
        "connect_s": round(opened.seconds, 2),
        "rss_before_mib": _mib(before.rss),
        "rss_after_mib": _mib(after.rss),
        "kib_per_conn": round((after.rss - before.rss) / 1024 / up, 2) if up else None,
        "redis_kib_per_conn": round((redis_after.rss - redis_before.rss) / 1024 / up, 2) if up else None,
        "cpu_s": round(after.cpu - before.cpu, 2),
        "processes": after.processes,
    }


# B: fan-out ---------------------------------------------------------------------------------

async def fan_out(kind: TargetKind, target: Target, *, n: int, events: int, rate: float, workdir: Path,
                  quiet: float = 1.0, transport: str = "sse") -> dict[str, Any]:
    """``n`` subscribers on one topic, ``events`` published at ``rate``/s."""
    topic = "bench-b"
    path = _paths(kind, [topic], transport)[0]
    opened = await open_subscribers(HOST, target.port, _factories(kind, target.port, [path] * n, transport))
    spec = publisher_spec(kind, target, mode="rate", topics=[topic], count=events, rate=rate,
                          max_seconds=events / rate * 3 + 10)
    stats, cpu = await publish_and_wait(target, opened.group, spec, workdir, quiet=quiet)
    up = alive(opened.subscribers)
    found, _ = count_ticks(opened.subscribers)
    close_all(opened.subscribers)
    ready = [s for s in opened.subscribers if s.ready_at]
    expected = len(ready) * stats["published"]
    return {
        "subscribers": n,
        "connected": len(ready),
        "still_connected": up,
        "published": stats["published"],
        "publish_errors": stats["errors"],
        "publish_rate": round(stats["rate"], 2) if stats["rate"] else None,
        "expected": expected,
        "delivered": found.delivered,
        "lost": expected - found.unique,
        "duplicated": found.duplicated,
        "out_of_order": found.out_of_order,
        **_rounded(latency_summary(found.latencies_ms)),
        "cpu_s": round(cpu, 2),
        **_parties(cpu, stats, found.delivered),
    }


def _rounded(summary: dict[str, float | None]) -> dict[str, float | None]:
    return {k: round(v, 2) if v is not None else None for k, v in summary.items()}


# C and E-C: many 1:1 topics -------------------------------------------------------------------

async def many_topics(kind: TargetKind, target: Target, *, n: int, workdir: Path, transport: str,
                      rate: float | None = None, rounds: int = 1, quiet: float = 1.0) -> dict[str, Any]:
    """``n`` subscribers each on its own topic, one event each.

    Without ``rate`` the events go out as fast as the publisher goes (pipelined batches, so the
    server, not the publisher, sets the pace), ``rounds`` times with a quiet pause between: each
    round's rate is its deliveries over the time from its first publish to its last arrival, and
    the median round is the figure (a single 0.1 s burst is at the mercy of the scheduler). With
    ``rate``, paced at ``rate`` per second, once.
    """
    topics = [f"bench-c-{i}" for i in range(n)]
    opened = await _open(kind, target, topics, transport)
    if rate is None:
        spec = publisher_spec(kind, target, mode="burst", topics=topics, batch=50, concurrency=4, rounds=rounds,
                              max_seconds=60)
    else:
        spec = publisher_spec(kind, target, mode="rate", topics=topics, count=n, rate=rate, concurrency=8,
                              max_seconds=n / rate * 3 + 10)
    stats, cpu = await publish_and_wait(target, opened.group, spec, workdir, quiet=quiet)
    found, _ = count_ticks(opened.subscribers)
    close_all(opened.subscribers)
    ready = sum(1 for s in opened.subscribers if s.ready_at)
    per_round = _round_rates(found, stats.get("rounds") or [], n)
    if per_round:
        deliveries_per_s: float | None = statistics.median(r["deliveries_per_s"] for r in per_round)
        publish_rate: float | None = statistics.median(r["publish_rate"] for r in per_round)
    else:
        span = (found.last_arrival_ns - stats["first_ns"]) / 1e9 if found.delivered else 0
        deliveries_per_s = found.delivered / span if span > 0 else None
        publish_rate = stats["rate"]
    expected = ready * max(1, len(per_round))
    return {
        "subscribers": n,
        "connected": ready,
        "connect_s": round(opened.seconds, 2),
        "published": stats["published"],
        "rounds": len(per_round) or 1,
        "publish_rate": round(publish_rate, 1) if publish_rate else None,
        "expected": expected,
        "delivered": found.delivered,
        "lost": expected - found.unique,
        "duplicated": found.duplicated,
        "deliveries_per_s": round(deliveries_per_s, 1) if deliveries_per_s else None,
        "round_rates": [round(r["deliveries_per_s"]) for r in per_round],
        **_rounded(latency_summary(found.latencies_ms)),
        "cpu_s": round(cpu, 2),
        **_parties(cpu, stats, found.delivered),
    }


def _parties(cpu: float, stats: dict[str, Any], delivered: int) -> dict[str, float | None]:
    """CPU µs per delivery of the server and of the rest of the pipeline, on the same cores."""
    return {
        "cpu_us_per_delivery": _per(cpu, delivered),
        "publisher_cpu_us_per_delivery": _per(stats.get("cpu_s"), delivered),
        "redis_cpu_us_per_delivery": _per(stats.get("redis_cpu_s"), delivered),
        "loadgen_cpu_us_per_delivery": _per(stats.get("loadgen_cpu_s"), delivered),
    }


def _per(cpu_s: float | None, deliveries: int) -> float | None:
    return round(cpu_s / deliveries * 1e6, 1) if cpu_s is not None and deliveries else None


def _round_rates(found: Deliveries, rounds: list[dict[str, Any]], n: int) -> list[dict[str, float]]:
    """Each burst round's deliveries per second (first publish to last arrival) and publish rate."""
    out = []
    for r in rounds:
        seqs = range(r["round"] * n, (r["round"] + 1) * n)
        tallies = [found.by_seq[s] for s in seqs if s in found.by_seq]
        if not tallies:
            continue
        span = (max(t[1] for t in tallies) - r["first_ns"]) / 1e9
        publish_span = (r["last_ns"] - r["first_ns"]) / 1e9
        if span > 0 and publish_span > 0:
            out.append({"deliveries_per_s": sum(t[0] for t in tallies) / span,
                        "publish_rate": r["published"] / publish_span})
    return out


# D: end to end ------------------------------------------------------------------------------

async def end_to_end(kind: TargetKind, target: Target, *, rooms: int, rates: tuple[int, ...],
                     step_seconds: float) -> dict[str, Any]:
    """POST → 202 → worker → correlated event on the room's SSE stream, at stepped rates."""
    room_names = [f"bench-d-{i}" for i in range(rooms)]
    paths = [kind.room_path(r) for r in room_names]
    opened = await open_subscribers(HOST, target.port, _factories(kind, target.port, paths, "sse"))
    if opened.connected < rooms:
        raise RuntimeError(f"only {opened.connected} of {rooms} room streams connected: {opened.group.errors}")
    pool = await HTTPPool(HOST, target.port, size=64).start()
    steps: list[dict[str, Any]] = []
    sent: dict[str, int] = {}  # operation id → scheduled POST time (ns)
    try:
        # one operation through the whole path first, so the worker is known to be up before timing starts
        status, body = await pool.post(*kind.command(room_names[0], -1), timeout=20)
        if status != 202:
            raise RuntimeError(f"the warm-up command was answered {status}: {body[:300]!r}")
        await _wait_delivered(opened.subscribers, [kind.operation_id(body)], cap=20)
        seq = 0
        for rate in rates:
            step, seq = await _step(kind, pool, room_names, rate, step_seconds, seq, sent)
            await _wait_delivered(opened.subscribers, step["ops"], cap=max(3.0, step_seconds))
            step.update(_step_latency(opened.subscribers, step["ops"], sent))
            step.pop("ops")
            steps.append(step)
            if step["p99_ms"] is None or step["p99_ms"] > 1000 or step["delivered"] < 0.9 * step["accepted"]:
                break
    finally:
        pool.close()
        close_all(opened.subscribers)
    target.check_alive()
    for s in steps:  # held: every command accepted and delivered, the rate kept, p99 under 100 ms
        s["sustained"] = (s["accepted"] == s["posted"] and s["delivered"] == s["accepted"]
                          and s["achieved_rate"] >= 0.95 * s["rate"] and s["p99_ms"] is not None and s["p99_ms"] <= 100)
    sustained = [s for s in steps if s["sustained"]]
    at_500 = next((s for s in steps if s["rate"] == 500), None)
    at_1000 = next((s for s in steps if s["rate"] == 1000), None)
    return {
        "rooms": rooms,
        "steps": steps,
        "max_rate_p99_under_100ms": max((s["rate"] for s in sustained), default=0),
        "p50_ms_at_500": at_500["p50_ms"] if at_500 else None,
        "p99_ms_at_500": at_500["p99_ms"] if at_500 else None,
        "p99_ms_at_1000": at_1000["p99_ms"] if at_1000 else None,
    }


async def _step(kind: TargetKind, pool: HTTPPool, rooms: list[str], rate: int, seconds: float, seq: int,
                sent: dict[str, int]) -> tuple[dict[str, Any], int]:
    count = int(rate * seconds)
    ops: list[str] = []
    errors: dict[str, int] = {}
    post_ms: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, at_ns: int) -> None:
        path, body = kind.command(rooms[i % len(rooms)], i)
        try:
            status, answer = await pool.post(path, body)
        except (OSError, TimeoutError, ConnectionError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        post_ms.append((time.time_ns() - at_ns) / 1e6)
        if status != 202:
            errors[str(status)] = errors.get(str(status), 0) + 1
            return
        op_id = kind.operation_id(answer)
        sent[op_id] = at_ns
        ops.append(op_id)

    t0 = time.monotonic()
    t0_ns = time.time_ns()
    posted = 0
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) > rate * 2:  # more than two seconds behind: the server is not keeping up
            errors["backlog"] = count - i
            break
        task = asyncio.ensure_future(one(seq + i, t0_ns + int(i / rate * 1e9)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        posted += 1
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    elapsed = time.monotonic() - t0
    post_ms.sort()
    return {
        "rate": rate,
        "posted": posted,
        "accepted": len(ops),
        "achieved_rate": round(len(ops) / elapsed, 1) if elapsed > 0 else 0,
        "post_p99_ms": round(post_ms[int(len(post_ms) * 0.99) - 1], 2) if post_ms else None,
        "errors": errors,
        "ops": ops,
    }, seq + count


def _correlated(subs: list[Subscriber]) -> dict[str, int]:
    arrivals: dict[str, int] = {}
    for sub in subs:
        for message in _messages(sub):
            env = envelope(message.json())
            if env is not None and env.get("type") == "ChatMessageDelivered":
                cid = env.get("correlationid")
                if cid and cid not in arrivals:
                    arrivals[cid] = message.arrived_ns
    return arrivals


async def _wait_delivered(subs: list[Subscriber], ops: list[str], *, cap: float) -> None:
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        arrivals = _correlated(subs)
        if all(op in arrivals for op in ops):
            return
        await asyncio.sleep(0.25)


def _step_latency(subs: list[Subscriber], ops: list[str], sent: dict[str, int]) -> dict[str, Any]:
    arrivals = _correlated(subs)
    latencies = [(arrivals[op] - sent[op]) / 1e6 for op in ops if op in arrivals]
    return {"delivered": len(latencies), **_rounded(latency_summary(latencies))}


# P: publishing over HTTP -------------------------------------------------------------------

async def open_receiving(kind: TargetKind, target: Target, topics: list[str], *, wait: float = 10.0) -> OpenResult:
    """One SSE subscriber per topic, each seen to receive before the measurement: a warm-up event published to
    every topic (sequence number -1, which :func:`count_ticks` leaves out) reached every one of them.
    """
    from bench.publisher import Ticks

    opened = await _open(kind, target, topics, "sse")
    if opened.connected < len(topics):
        raise RuntimeError(f"only {opened.connected} of {len(topics)} streams connected: {opened.group.errors}")
    warm_up = Ticks().encoded(-1, time.time_ns())
    pool = await HTTPPool(HOST, target.port, size=1).start()
    try:
        for topic in topics:
            path, headers = kind.publish_request(topic)
            body, content_type = kind.publish_body(topic, warm_up)
            status, answer = await pool.post(path, body, content_type=content_type, headers=headers)
            if status not in (200, 201, 202):
                raise RuntimeError(f"the warm-up publish to {topic} was answered {status}: {answer[:200]!r}")
    finally:
        pool.close()
    deadline = time.monotonic() + wait
    while not all(_messages(sub) for sub in opened.subscribers):
        if time.monotonic() > deadline:
            close_all(opened.subscribers)
            raise RuntimeError(f"a subscriber did not get the warm-up event within {wait:.0f} s")
        await asyncio.sleep(0.05)
    return opened


async def publish_throughput(kind: TargetKind, target: Target, *, events: int, batch: int, topics: int,
                             workdir: Path, quiet: float = 1.0) -> dict[str, Any]:
    """``events`` published over HTTP as fast as they go, ``batch`` per request, on ``topics`` topics.

    Herald takes a batch as one JSON array (``batch`` 1: a single event per request); nchan has no
    batch, so it always gets one event per request. One publisher connection per topic, so each
    topic's events are stored in the order published; one SSE subscriber per topic checks that
    every event arrives once and in order. The rate is published events over the time from the
    first request to the last answer.
    """
    names = [f"bench-p-{i}" for i in range(topics)]
    opened = await open_receiving(kind, target, names)
    per_request = batch if kind.name == "herald" else 1
    spec = publisher_spec(kind, target, mode="stream", via="http", topics=names, count=events, batch=per_request,
                          concurrency=topics, publish_key=SECRET, max_seconds=30)
    stats, cpu = await publish_and_wait(target, opened.group, spec, workdir, quiet=quiet)
    return publish_figures(opened, stats, cpu, events=events, per_request=per_request)


def publish_figures(opened: OpenResult, stats: dict[str, Any], cpu: float, *, events: int,
                    per_request: int) -> dict[str, Any]:
    """Scenario P's figures, once the publisher is done: rates, deliveries, latency, CPU by party."""
    found, _ = count_ticks(opened.subscribers)
    close_all(opened.subscribers)
    seconds = stats["seconds"]
    published = stats["published"]
    return {
        "events": events,
        "events_per_request": per_request,
        "published": published,
        "publish_errors": stats["errors"],
        "events_per_s": round(published / seconds, 1) if published and seconds > 0 else None,
        "requests_per_s": round(published / per_request / seconds, 1) if published and seconds > 0 else None,
        "expected": published,
        "delivered": found.delivered,
        "lost": published - found.unique,
        "duplicated": found.duplicated,
        "out_of_order": found.out_of_order,
        **_rounded(latency_summary(found.latencies_ms)),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_event": _per(cpu, published),
        "publisher_cpu_us_per_event": _per(stats.get("cpu_s"), published),
        "redis_cpu_us_per_event": _per(stats.get("redis_cpu_s"), published),
        "loadgen_cpu_us_per_event": _per(stats.get("loadgen_cpu_s"), published),
    }


# The list of cases ---------------------------------------------------------------------------

def cases(selected: list[str], sizes: Sizes, workdir_of: Callable[[], Path]) -> list[Case]:
    """The scenario variants to run, in order."""
    out: list[Case] = []
    if "A" in selected:
        for n in sizes.a_sizes:
            out.append(Case("A", f"SSE idle x{n}", functools.partial(idle_capacity, n=n, transport="sse",
                                                                          settle=sizes.settle_seconds,
                                                                          deadline=sizes.connect_deadline)))
    if "B" in selected:
        out.append(Case("B", f"fan-out {sizes.b_subscribers} subs x {sizes.b_events} events @ {sizes.b_rate:g}/s",
                        lambda k, t: fan_out(k, t, n=sizes.b_subscribers, events=sizes.b_events, rate=sizes.b_rate,
                                             workdir=workdir_of(), quiet=sizes.quiet_seconds)))
    if "C" in selected:
        out.append(Case("C", f"1:1 topics x{sizes.c_subscribers} (SSE), as fast as it goes",
                        lambda k, t: many_topics(k, t, n=sizes.c_subscribers, workdir=workdir_of(), transport="sse",
                                                 rounds=sizes.c_rounds, quiet=sizes.quiet_seconds)))
        out.append(Case("C", f"1:1 topics x{sizes.c_subscribers} (SSE), paced {sizes.c_rate:,.0f}/s",
                        lambda k, t: many_topics(k, t, n=sizes.c_subscribers, workdir=workdir_of(), transport="sse",
                                                 rate=sizes.c_rate, quiet=sizes.quiet_seconds)))
    if "D" in selected:
        out.append(Case("D", f"POST->event, {sizes.d_rooms} room streams, steps {'/'.join(map(str, sizes.d_rates))}/s",
                        functools.partial(end_to_end, rooms=sizes.d_rooms, rates=sizes.d_rates,
                                          step_seconds=sizes.d_step_seconds), commands=True))
    if "S" in selected:  # beside D (the command path), before the long cases that could use up the budget
        out.append(Case("S", f"{sizes.s_commands:,} commands at full speed, each to its own SSE subscriber "
                             f"({sizes.s_concurrency} connections)",
                        functools.partial(saturation, n=sizes.s_commands, concurrency=sizes.s_concurrency),
                        commands=True))
    if {"C", "D", "S"} & set(selected):  # C and D (and S) again, on a Redis Cluster (bench/cluster.py)
        from bench.cluster import cluster_cases

        out += cluster_cases(selected, sizes, workdir_of)
    if "E" in selected:
        for n in sizes.e_sizes:
            out.append(Case("E", f"WS idle x{n}", functools.partial(idle_capacity, n=n, transport="ws",
                                                                         settle=sizes.settle_seconds,
                                                                          deadline=sizes.connect_deadline)))
        out.append(Case("E", f"1:1 topics x{sizes.e_c_subscribers} (WS), as fast as it goes",
                        lambda k, t: many_topics(k, t, n=sizes.e_c_subscribers, workdir=workdir_of(),
                                                 transport="ws", rounds=sizes.c_rounds,
                                                 quiet=sizes.quiet_seconds)))
    if "P" in selected:
        out.append(Case("P", f"publish {sizes.p_events:,} events over HTTP, {sizes.p_batch} per request "
                             "(nchan: 1, it has no batch)",
                        lambda k, t: publish_throughput(k, t, events=sizes.p_events, batch=sizes.p_batch,
                                                        topics=sizes.p_topics, workdir=workdir_of(),
                                                        quiet=sizes.quiet_seconds), publishes=True))
        out.append(Case("P", f"publish {sizes.p_single_events:,} events over HTTP, 1 per request",
                        lambda k, t: publish_throughput(k, t, events=sizes.p_single_events, batch=1,
                                                        topics=sizes.p_topics, workdir=workdir_of(),
                                                        quiet=sizes.quiet_seconds), publishes=True))
        out.append(Case("P", f"publish {sizes.p_single_events:,} updates through the Mercure hub, 1 per request "
                             "(nchan: POST /pub)",
                        lambda k, t: mercure_throughput(k, t, events=sizes.p_single_events, topics=sizes.p_topics,
                                                        workdir=workdir_of(), quiet=sizes.quiet_seconds),
                        publishes=True))
    if "R" in selected:
        for variant, start in (("Python handler", start_direct), ("proxied to an upstream", start_proxied)):
            out.append(Case("R", f"{variant}, {sizes.r_clients} clients x {sizes.r_seconds:g} s, Prefer: wait",
                            functools.partial(request_reply, seconds=sizes.r_seconds, clients=sizes.r_clients),
                            commands=True, start=start, only="herald"))
    return out
