"""``python -m bench [--quick | --tiny] [--scenarios A,B,C,D,E,P,R,S] [--targets herald,naive,nchan]``.

Runs each scenario against a freshly started server per target (each with a fresh redis-server
of its own on a free loopback port), then appends the results to ``bench/results/runs.jsonl`` and
writes the table to ``bench/results/latest.md`` (``latest-quick.md`` / ``latest-tiny.md`` for the
smaller modes). The full run keeps under seven minutes on a 2-core machine; ``--quick`` is a
minute or so; ``--tiny`` (a few dozen connections) is what the smoke test runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import servers
from bench.report import Result, write
from bench.scenarios import FULL, QUICK, TINY, Case, cases
from bench.servers import ProcTree, RedisServer, machine_busy_seconds, raise_fd_limit
from bench.targets import TargetKind, make_targets

RESULTS = Path(__file__).resolve().parent / "results"
TIME_LIMIT = 400.0  # seconds: the whole run stays under seven minutes; later cases are skipped past it


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=servers.ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "herald", "app", "bench"], cwd=servers.ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _describe(kinds: list[TargetKind]) -> dict[str, str]:
    uvicorn = "uvicorn --loop uvloop --http httptools --ws websockets-sansio, one process"
    out: dict[str, str] = {}
    for kind in kinds:
        if kind.name == "herald":
            broker = ("Redis broker, one gateway process + one `python -m herald.worker`" if servers.herald_uses_redis()
                      else "memory broker with the embedded worker (the Redis broker is not in this tree yet)")
            out["herald"] = f"{broker}; {uvicorn.replace('httptools', servers.HERALD_HTTP)}"
        elif kind.name == "naive":
            out["naive"] = ("bench/baselines/naive.py: starlette + sse-starlette, one Redis pub/sub connection per "
                            f"subscriber, commands via a Redis list and one worker process; {uvicorn}")
        elif kind.name == "nchan":
            out["nchan"] = "nginx 1.22 + nchan 1.3.6 (Debian), 1 worker process, Redis storage (nchan_redis_pass)"
    return out


def _our_cpu() -> float:
    """CPU seconds of the bench, its live children (servers, Redis, publisher) and the children it reaped."""
    reaped = os.times()
    return ProcTree(os.getpid()).usage().cpu + reaped.children_user + reaped.children_system


async def run_case(case: Case, kind: TargetKind, workdir: Path) -> Result:
    """Start a fresh Redis and server, run the case, stop both."""
    result = Result(case.scenario, case.variant, kind.name, notes=list(case.notes))
    start = time.monotonic()
    busy0, ours0 = machine_busy_seconds(), _our_cpu()
    redis = RedisServer(workdir).start()
    try:
        target = case.start(workdir, redis) if case.start else kind.start(workdir, redis, commands=case.commands)
        result.notes.extend(target.notes)
        try:
            result.metrics = await asyncio.wait_for(case.run(kind, target), 150)
        finally:
            target.stop()
    except Exception as exc:  # a failing case is reported, and the run goes on
        result.error = f"{type(exc).__name__}: {str(exc)[:600]}"
    finally:
        # measured before Redis stops, so our children's CPU is still counted as ours
        other = (machine_busy_seconds() - busy0) - (_our_cpu() - ours0)
        redis.stop()
        result.seconds = round(time.monotonic() - start, 1)
    if other > max(1.0, 0.1 * result.seconds):
        result.notes.append(f"{other:.1f} CPU-s went to processes outside the bench during this case "
                            f"({result.seconds:.0f} s): other programs, or the kernel's network threads")
    result.metrics["other_cpu_s"] = round(other, 2)
    return result


async def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the cases, write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    mode.add_argument("--tiny", action="store_true", help="a few dozen connections (the smoke test)")
    parser.add_argument("--scenarios", default="A,B,C,D,E,P,R,S", help="comma-separated, from A,B,C,D,E,P,R,S")
    parser.add_argument("--targets", default="herald,naive,nchan", help="comma-separated, from herald,naive,nchan")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where runs.jsonl and the table go")
    args = parser.parse_args(argv)

    sizes, mode_name = (QUICK, "quick") if args.quick else (TINY, "tiny") if args.tiny else (FULL, "full")
    selected = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    kinds = make_targets([t.strip() for t in args.targets.split(",") if t.strip()])
    nofile = raise_fd_limit()
    begun = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: list[Result] = []
    floor = _write_floor(sizes.c_subscribers) if "C" in selected else None
    probe = speed_probe()
    with tempfile.TemporaryDirectory(prefix="herald-bench-") as tmp:
        counter = iter(range(10**6))
        workdir = Path(tmp)

        def case_dir() -> Path:
            return workdir

        for case in cases(selected, sizes, case_dir):
            for kind in kinds:
                if (case.commands and not kind.supports_commands) or (case.publishes and not kind.publish_api):
                    continue
                if case.only is not None and kind.name != case.only:
                    continue
                if time.monotonic() - begun > TIME_LIMIT:
                    results.append(Result(case.scenario, case.variant, kind.name,
                                          error=f"skipped: the run passed its {TIME_LIMIT:.0f} s budget"))
                    continue
                workdir = Path(tmp) / f"case-{next(counter)}"
                workdir.mkdir()
                result = await run_case(case, kind, workdir)
                status = f"error: {result.error}" if result.error else _headline(result)
                print(f"[{time.monotonic() - begun:5.0f}s] {case.scenario} {case.variant} / {kind.name}: {status}",
                      flush=True)
                results.append(result)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {
        "run": started.replace(" ", "T") + f"-{os.getpid()}",
        "mode": mode_name,
        "started": started,
        "command": "make bench" if mode_name == "full" and argv is None and not sys.argv[1:] else command.strip(),
        "commit": _commit(),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, fd limit {nofile}, "
                   f"speed probe {probe:.0f} ms",
        "speed_probe_ms": probe,
        "seconds": time.monotonic() - begun,
        "targets": _describe(kinds),
        "write_floor": floor,
    }
    table = write(args.out, results, meta, [k.name for k in kinds])
    print(table.read_text())
    print(f"bench: table in {table}, JSON lines in {args.out / 'runs.jsonl'}")
    return 1 if any(r.error and not r.error.startswith("skipped") for r in results) else 0


def speed_probe() -> float:
    """Milliseconds for a fixed pure-Python workload (best of three): how fast this machine is today.

    The same commit measured on the same kind of machine on different days differed by 1.5x in
    server CPU; this figure, printed with every run, tells such runs apart.
    """
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i & 7
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def _write_floor(connections: int) -> dict[str, float] | None:
    """``python -m bench.floor``: the kernel's CPU per write to one of ``connections`` loopback sockets."""
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.floor", "--connections", str(connections)],
                              capture_output=True, text=True, timeout=60, cwd=servers.ROOT)
        floor: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
        return floor
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        print(f"bench: the write floor was not measured: {exc}", file=sys.stderr)
        return None


def _headline(result: Result) -> str:
    m = result.metrics
    keys = ("connected", "failed", "kib_per_conn", "connect_s", "delivered", "expected", "lost", "p50_ms", "p99_ms",
            "deliveries_per_s", "max_rate_p99_under_100ms", "p99_ms_at_500", "events_per_s", "cpu_us_per_event",
            "commands_per_s", "cpu_us_per_command", "server_cpu_us_per_command")
    return ", ".join(f"{k}={m[k]}" for k in keys if k in m) + f" ({result.seconds}s)"


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main()))
