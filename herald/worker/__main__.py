"""``herald worker module:target [--burst]`` (or ``python -m herald.worker``): run handlers against the broker.

The target is a :class:`~herald.Domain` (its handlers), or a settings class naming the handlers
and limits, as in arq. The broker comes from ``REDIS_URL``; a worker needs a broker shared with the gateway,
so without ``REDIS_URL`` it refuses to start. SIGTERM and SIGINT stop it gracefully: it
takes no new work, lets current jobs finish within the grace period, and gives the rest
back to the broker for another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from herald.broker import create_broker
from herald.logs import configure_logging
from herald.settings import Settings, SettingsError
from herald.worker import Worker, WorkerSettings, worker_options
from herald.worker.targets import LoadError, load_worker_spec

DESCRIPTION = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's arguments, shared by ``python -m herald.worker`` and ``herald worker``."""
    parser.add_argument("target", nargs="?",
                        help="module:domain (a herald.Domain) or module:Class (a settings class)")
    parser.add_argument("--burst", action="store_true", help="exit when no work is left")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs at once (default: HERALD_WORKER_CONCURRENCY)")


async def work(args: argparse.Namespace, spec: type[WorkerSettings] | None = None) -> int:
    """Build the worker the parsed ``args`` describe and run it until stopped; the exit status.

    ``spec``: the handlers and limits to run instead of those of ``args.target`` (``herald worker --config``
    reads a proxy config file into them).
    """
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"herald worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if not settings.redis_url:
        print("herald worker needs REDIS_URL: the embedded broker lives inside the gateway process",
              file=sys.stderr)
        return 2
    if spec is None:
        if not args.target:
            print("herald worker: name a target (module:domain or module:Class)", file=sys.stderr)
            return 2
        try:
            spec = load_worker_spec(args.target)
        except LoadError as exc:
            print(f"herald worker: {exc}", file=sys.stderr)
            return 2
    if not spec.handlers:
        print(f"herald worker: {args.target or 'the configuration'} declares no handlers", file=sys.stderr)
        return 2
    broker = create_broker(settings.redis_url, **settings.broker_options())
    await broker.start()
    worker = Worker(broker, spec.handlers, settings=settings,
                    **worker_options(settings, spec, concurrency=args.concurrency))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    logging.getLogger("herald.worker").info(
        "worker %s started: %s", worker.name, ", ".join(spec.handlers), extra={"event": "worker.start"}
    )
    try:
        await worker.run(burst=args.burst)
    except SettingsError as exc:  # a handler the settings cannot serve (the proxy without a callback URL)
        print(f"herald worker: {exc}", file=sys.stderr)
        return 2
    finally:
        await broker.close()
    return 0


async def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the worker and run it until stopped."""
    parser = argparse.ArgumentParser(prog="python -m herald.worker", description=DESCRIPTION)
    add_arguments(parser)
    return await work(parser.parse_args(argv))


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop (installed with uvicorn[standard]) when it is there, else on asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(main)
    return uvloop.run(main)


def run() -> int:
    """``python -m herald.worker``: :func:`main` on the best event loop at hand."""
    return run_loop(main())


if __name__ == "__main__":
    sys.exit(run())
