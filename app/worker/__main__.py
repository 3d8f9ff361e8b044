"""``python -m app.worker [module:Settings] [--burst]``: run handlers against the broker.

The settings class (default ``app.chat.worker:WorkerSettings``) names the handlers, as in
arq. The broker comes from ``REDIS_URL``; a worker needs a broker shared with the gateway,
so without ``REDIS_URL`` it refuses to start. SIGTERM and SIGINT stop it gracefully: it
takes no new work, lets current jobs finish within the grace period, and gives the rest
back to the broker for another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys

from app.broker import create_broker
from app.logs import configure_logging
from app.settings import Settings
from app.worker import Worker, WorkerSettings

DEFAULT_SETTINGS = "app.chat.worker:WorkerSettings"
DEFAULT_GRACE = 10.0
"""Seconds current jobs get after SIGTERM when the settings class names no ``shutdown_grace``."""


def load_settings(path: str) -> type[WorkerSettings]:
    """Import ``module:Class``."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise SystemExit(f"expected module:Class, got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


async def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the worker and run it until stopped."""
    parser = argparse.ArgumentParser(prog="python -m app.worker", description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="?", default=DEFAULT_SETTINGS, help="module:Class (default: %(default)s)")
    parser.add_argument("--burst", action="store_true", help="exit when no work is left")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs at once (default: HERALD_WORKER_CONCURRENCY)")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if not settings.redis_url:
        print("python -m app.worker needs REDIS_URL: the embedded broker lives inside the gateway process",
              file=sys.stderr)
        return 2
    spec = load_settings(args.settings)
    broker = create_broker(settings.redis_url, **settings.broker_options())
    await broker.start()
    worker = Worker(
        broker,
        spec.handlers,
        concurrency=args.concurrency or spec.concurrency or settings.worker_concurrency,
        max_attempts=spec.max_attempts or settings.max_attempts,
        shutdown_grace=DEFAULT_GRACE if spec.shutdown_grace is None else spec.shutdown_grace,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    logging.getLogger("herald.worker").info(
        "worker %s started: %s", worker.name, ", ".join(spec.handlers), extra={"event": "worker.start"}
    )
    try:
        await worker.run(burst=args.burst)
    finally:
        await broker.close()
    return 0


def run() -> int:
    """Run :func:`main` on uvloop (installed with uvicorn[standard]) when it is there, else on asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(main())
    return uvloop.run(main())


if __name__ == "__main__":
    sys.exit(run())
