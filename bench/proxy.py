"""Scenario R: commands forwarded to an upstream HTTP service (the command proxy), beside Python handlers.

Both variants run the same command, ``POST /jobs`` with a small JSON body, on the bench's Redis with
one gateway process and one worker process:

* **Python handler**: ``herald serve --domain bench.proxy:direct`` and ``herald worker bench.proxy:direct``;
  the handler succeeds with a document at once.
* **proxied**: ``herald serve --config`` and ``herald worker --config`` of a file whose command is
  forwarded to :mod:`bench.upstream` (a uvicorn process answering ``200`` with JSON at once), with the
  callback token, the CloudEvents headers and the outcome handling of every proxied command.

``clients`` connections each send the command with ``Prefer: wait=10`` and send the next as soon as the
answer (``200``, the operation succeeded) is in: a closed loop for ``seconds``. Reported: commands per
second, the answer's latency, and the CPU per command of each party: gateway, worker, upstream, Redis
and the load generator (this process).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import HTTPPool, latency_summary
from bench.servers import HOST, PYTHON, SECRET, UVICORN_FLAGS, RedisServer, Target, free_port, spawn, wait_http
from bench.targets import TargetKind
from herald import Context, Domain

PATH = "/jobs"
EVENT = "BenchJobRequested"
SCHEMA = {"type": "object", "properties": {"size": {"type": "integer"}}}
PARTIES = [("gateway", "gateway"), ("worker", "worker"), ("upstream", "upstream"), ("redis", "Redis"),
           ("loadgen", "load generator (bench)")]

direct = Domain("bench-direct")
"""The Python-handler variant's domain: the same command, handled in the worker."""


@direct.command("POST", PATH, event=EVENT, schema=SCHEMA)
def _job(params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    return body


@direct.handler(EVENT)
async def _done(ctx: Context) -> None:
    await ctx.succeed({"job": ctx.event.id, "size": ctx.data.get("size")})


def config_text(upstream: str) -> str:
    """The proxied variant's ``herald.toml``."""
    return (f'[[command]]\npath = "{PATH}"\nevent = "{EVENT}"\nupstream = "{upstream}{PATH}"\ntimeout = 10\n'
            f'schema = {{ type = "object", properties = {{ size = {{ type = "integer" }} }} }}\n')


def _env(redis: RedisServer, **extra: str) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis.url, "HERALD_SECRET": SECRET, "HERALD_EMBEDDED_WORKER": "0",
           "HERALD_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1", "HERALD_WORKER_CONCURRENCY": "32",
           # the load generator is one address sending far faster than the anonymous default lets one client
           "HERALD_RATE_LIMIT": "0", **extra}
    return env


def _serve(port: int, target: list[str]) -> list[str]:
    return [PYTHON, "-m", "herald", "serve", *target, "--host", HOST, "--port", str(port), "--backlog", "4096",
            "--no-access-log", "--timeout-graceful-shutdown", "1"]


def start_direct(workdir: Path, redis: RedisServer) -> Target:
    """The Python-handler variant: a gateway and a worker of :data:`direct`."""
    port = free_port()
    env = _env(redis)
    target = Target("herald", port, redis)
    target.processes.append(spawn("gateway", _serve(port, ["--domain", "bench.proxy:direct"]), workdir, env=env))
    target.processes.append(spawn("worker", [PYTHON, "-m", "herald", "worker", "bench.proxy:direct"], workdir,
                                  env=env))
    return _ready(target, f"http://{HOST}:{port}/readyz")


def start_proxied(workdir: Path, redis: RedisServer) -> Target:
    """The proxied variant: the upstream, a gateway and a worker of the config file forwarding to it."""
    port, upstream_port = free_port(), free_port()
    config = workdir / "herald.toml"
    config.write_text(config_text(f"http://{HOST}:{upstream_port}"))
    env = _env(redis, HERALD_CALLBACK_URL=f"http://{HOST}:{port}")
    target = Target("herald", port, redis)
    target.processes.append(spawn("upstream", [
        PYTHON, "-m", "uvicorn", "bench.upstream:app", "--host", HOST, "--port", str(upstream_port), *UVICORN_FLAGS,
    ], workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    target.processes.append(spawn("gateway", _serve(port, ["--config", str(config)]), workdir, env=env))
    target.processes.append(spawn("worker", [PYTHON, "-m", "herald", "worker", "--config", str(config)], workdir,
                                  env=env))
    return _ready(target, f"http://{HOST}:{upstream_port}/healthz", f"http://{HOST}:{port}/readyz")


def _ready(target: Target, *urls: str) -> Target:
    """Wait for each of ``urls`` to answer 200; stop the target's processes if one never does."""
    try:
        for url in urls:
            wait_http(url, target.processes)
    except BaseException:
        target.stop()
        raise
    return target


def _cpu(target: Target) -> dict[str, float]:
    """CPU seconds so far of each party of ``target`` (by process name), Redis and this process."""
    from bench.servers import ProcTree

    out = {p.name: ProcTree(p.pid).usage().cpu for p in target.processes}
    out["redis"] = target.redis.tree().usage().cpu
    out["loadgen"] = time.process_time()
    return out


async def request_reply(kind: TargetKind, target: Target, *, seconds: float, clients: int) -> dict[str, Any]:
    """Scenario R on a started variant: commands answered per second in a closed loop, and their cost."""
    pool = await HTTPPool(HOST, target.port, size=clients).start()
    body = orjson.dumps({"size": 128})
    headers = {"Prefer": "wait=10"}
    latencies: list[float] = []
    failures: list[str] = []
    try:
        for _ in range(clients):  # warm-up: connections, the worker's pool to the upstream, JIT-less caches
            await pool.post(PATH, body, headers=headers, timeout=15)
        before = _cpu(target)
        started = time.monotonic()
        deadline = started + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                status, answer = await pool.post(PATH, body, headers=headers, timeout=15)
                if status == 200 and b'"status":"succeeded"' in answer:
                    latencies.append((time.perf_counter() - sent) * 1000)
                else:
                    failures.append(f"{status} {answer[:120]!r}")

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.monotonic() - started
        after = _cpu(target)
    finally:
        pool.close()
    done = len(latencies)
    if not done:
        raise RuntimeError(f"no command succeeded: {failures[:3]}")
    metrics: dict[str, Any] = {"clients": clients, "seconds": round(elapsed, 2), "commands": done,
                               "failed": len(failures), "commands_per_s": round(done / elapsed, 1),
                               **{k: round(v, 2) if v is not None else None
                                  for k, v in latency_summary(latencies).items()}}
    for party, _ in PARTIES:
        spent = after[party] - before[party] if party in after else None
        metrics[f"{party}_cpu_us_per_command"] = None if spent is None else round(spent * 1e6 / done, 1)
    herald = [metrics[f"{p}_cpu_us_per_command"] for p in ("gateway", "worker")]
    metrics["cpu_us_per_command"] = round(sum(herald), 1)
    if failures:
        metrics["first_failure"] = failures[0]
    return metrics


METRICS = [("commands_per_s", "commands / s", "higher"), ("commands", "commands answered", "higher"),
           ("failed", "failed", "lower"), ("p50_ms", "answer p50 ms", "lower"), ("p99_ms", "answer p99 ms", "lower"),
           ("cpu_us_per_command", "Herald CPU µs / command (gateway + worker)", "lower")]
"""What the results table shows of scenario R (``bench.report``)."""


def budget(results: list[Any]) -> list[str]:
    """Scenario R's CPU per command, party by party, the two variants side by side."""
    rows = [r for r in results if r.scenario == "R" and not r.error]
    if not rows:
        return []
    lines = ["### R: CPU µs per command, by party", "",
             "| party | " + " | ".join(r.variant.split(",")[0] for r in rows) + " |", "|" + " --- |" * (len(rows) + 1)]
    for key, label in PARTIES:
        lines.append(f"| {label} | " + " | ".join(_fmt(r.metrics.get(f"{key}_cpu_us_per_command")) for r in rows)
                     + " |")
    lines.append("| commands / s | " + " | ".join(_fmt(r.metrics.get("commands_per_s")) for r in rows) + " |")
    return [*lines, ""]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:,.1f}" if isinstance(value, float) else str(value)
