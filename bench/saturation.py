"""Scenario S: the command path at saturation, each command delivered to its own subscriber.

``n`` SSE subscribers each follow a room of their own (Herald: ``chats/bench-s-{i}`` with a subscribe
token; naive: its channel). Once all are connected and one warm-up command went through the whole
path, ``n`` commands are POSTed, one per room, as fast as ``concurrency`` keep-alive connections send
them (a closed loop: each connection sends its next command when the answer to the last is in). The
event each worker publishes for a command (``ChatMessageDelivered``, with the operation's
correlation id) must reach that room's subscriber.

Reported: commands per second delivered (commands over the time from the first POST to the last
arrival) and accepted (to the last answer), the latency from a POST's send to its event's arrival,
the POST's own latency, and the CPU per command of each party, read from ``/proc`` over the same
window: the gateway, the worker, Redis, and the load generator (this process: the POSTs and the
subscribers). All of them share the machine's cores, so the rate cannot exceed cores x 10^6 / (their
sum of µs per command).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from bench.loadgen import (
    HTTPPool,
    SSESubscriber,
    close_all,
    envelope,
    latency_summary,
    open_subscribers,
    sse_messages,
    sse_request,
)
from bench.loadgen import Subscriber as RawSubscriber
from bench.servers import HOST, ProcTree, Target
from bench.targets import TargetKind

EVENT_TYPE = "ChatMessageDelivered"
PARTIES = [("gateway", "gateway"), ("worker", "worker"), ("redis", "Redis"), ("loadgen", "load generator (bench)")]
"""The parties whose CPU per command is reported, as ``<key>_cpu_us_per_command`` and their label."""


def _arrivals(subs: list[RawSubscriber]) -> dict[str, int]:
    """The arrival time of the first ``ChatMessageDelivered`` of each correlation id, over every subscriber."""
    out: dict[str, int] = {}
    for sub in subs:
        for message in sse_messages(sub.chunks)[1]:
            env = envelope(message.json())
            if env is not None and env.get("type") == EVENT_TYPE:
                cid = env.get("correlationid")
                if cid and cid not in out:
                    out[cid] = message.arrived_ns
    return out


def _party_trees(target: Target) -> dict[str, ProcTree]:
    """The gateway's and the worker's process trees, told apart by their names (``…-gateway``, ``…-worker``)."""
    trees: dict[str, ProcTree] = {}
    for process in target.processes:
        party = "worker" if process.name.endswith("worker") else "gateway"
        trees[party] = ProcTree(*(trees[party].roots if party in trees else ()), process.pid)
    trees["redis"] = target.redis.tree()
    return trees


def _cpu(trees: dict[str, ProcTree]) -> dict[str, float]:
    return {**{name: tree.usage().cpu for name, tree in trees.items()}, "loadgen": time.process_time()}


async def _wait_for(subs: list[RawSubscriber], baseline: list[int], *, cap: float) -> None:
    """Wait until every subscriber received a ``ChatMessageDelivered`` after ``baseline`` (its chunk count
    before), at most ``cap``.

    Only chunks that came since the last poll are looked at, for the event's name: a heartbeat (``:``)
    is bytes too, and counting it let the window close before late events arrived, which then
    showed as lost. The events themselves are parsed only after the window.
    """
    deadline = time.monotonic() + cap
    needle = EVENT_TYPE.encode()
    waiting = dict(enumerate(baseline))  # subscriber index -> the first chunk not yet looked at
    while waiting and time.monotonic() < deadline:
        for i, seen in list(waiting.items()):
            chunks = subs[i].chunks
            if len(chunks) == seen:
                continue
            # from the chunk before (past the baseline): a name cut in two by the network is found too
            if needle in b"".join(data for _, data in chunks[max(baseline[i], seen - 1):]):
                del waiting[i]
            else:
                waiting[i] = len(chunks)
        if waiting:
            await asyncio.sleep(0.02)


async def saturation(kind: TargetKind, target: Target, *, n: int, concurrency: int) -> dict[str, Any]:
    """``n`` commands as fast as ``concurrency`` connections send them, each to a room with its own subscriber."""
    rooms = [f"bench-s-{i}" for i in range(n)]
    hostport = f"{HOST}:{target.port}"
    factories = [functools.partial(SSESubscriber, sse_request(kind.room_path(room), hostport)) for room in rooms]
    opened = await open_subscribers(HOST, target.port, factories)
    if opened.connected < n:
        close_all(opened.subscribers)
        raise RuntimeError(f"only {opened.connected} of {n} room streams connected: {opened.group.errors}")
    subs = opened.subscribers
    pool = await HTTPPool(HOST, target.port, size=concurrency).start()
    trees = _party_trees(target)
    sent: dict[str, int] = {}
    post_ms: list[float] = []
    errors: dict[str, int] = {}
    try:
        warm = [len(s.chunks) for s in subs]
        status, body = await pool.post(*kind.command(rooms[0], -1), timeout=20)
        if status != 202:
            raise RuntimeError(f"the warm-up command was answered {status}: {body[:300]!r}")
        warm_id = kind.operation_id(body)
        deadline = time.monotonic() + 20
        while warm_id not in _arrivals([s for s, seen in zip(subs, warm, strict=True) if len(s.chunks) > seen]):
            if time.monotonic() > deadline:
                raise RuntimeError("the warm-up command's event did not arrive within 20 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the warm-up's stragglers (heartbeats, the worker's lease timer) pass
        baseline = [len(s.chunks) for s in subs]
        todo = iter(range(n))
        last_answer = 0

        async def sender() -> None:
            nonlocal last_answer
            for i in todo:
                path, payload = kind.command(rooms[i], i)
                at = time.time_ns()
                try:
                    status, answer = await pool.post(path, payload)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                now = time.time_ns()
                post_ms.append((now - at) / 1e6)
                if status != 202:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    continue
                sent[kind.operation_id(answer)] = at
                last_answer = max(last_answer, now)

        before = _cpu(trees)
        first = time.time_ns()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        await _wait_for(subs, baseline, cap=20.0)
        after = _cpu(trees)
    finally:
        pool.close()
        close_all(subs)
    target.check_alive()
    arrivals = _arrivals(subs)
    latencies = [(arrivals[op] - at) / 1e6 for op, at in sent.items() if op in arrivals]
    delivered = len(latencies)
    last_arrival = max((arrivals[op] for op in sent if op in arrivals), default=first)
    span, answer_span = (last_arrival - first) / 1e9, (last_answer - first) / 1e9
    cpu = {name: after[name] - before[name] for name in after}
    post_ms.sort()
    out: dict[str, Any] = {
        "subscribers": n,
        "connected": opened.connected,
        "concurrency": concurrency,
        "posted": n,
        "accepted": len(sent),
        "errors": errors,
        "delivered": delivered,
        "lost": len(sent) - delivered,
        "commands_per_s": round(delivered / span, 1) if delivered and span > 0 else None,
        "accepted_per_s": round(len(sent) / answer_span, 1) if sent and answer_span > 0 else None,
        **{k: round(v, 2) if v is not None else None for k, v in latency_summary(latencies).items()},
        "post_p99_ms": round(post_ms[max(0, int(len(post_ms) * 0.99) - 1)], 2) if post_ms else None,
        "cpu_s": round(cpu["gateway"] + cpu.get("worker", 0.0), 2),
    }
    for name, _ in PARTIES:
        out[f"{name}_cpu_us_per_command"] = round(cpu.get(name, 0.0) / delivered * 1e6, 1) if delivered else None
    out["server_cpu_us_per_command"] = (round((cpu["gateway"] + cpu.get("worker", 0.0) + cpu["redis"]) / delivered
                                              * 1e6, 1) if delivered else None)
    return out

