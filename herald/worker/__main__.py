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
import importlib
import logging
import signal
import sys
from typing import Any

from herald.broker import create_broker
from herald.domain import Domain
from herald.logs import configure_logging
from herald.settings import Settings, SettingsError
from herald.worker import Worker, WorkerSettings, worker_options


def load_object(path: str) -> Any:
    """Import ``module:attribute``; ``SystemExit`` with a message saying what is wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"expected module:attribute, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"module {module_name!r} has no attribute {attr!r}") from None


def load_worker_spec(path: str) -> type[WorkerSettings]:
    """The settings class at ``path``, or one made from the :class:`Domain` (or list of them) there."""
    target = load_object(path)
    domains = [target] if isinstance(target, Domain) else target if isinstance(target, list | tuple) else None
    if domains is not None and all(isinstance(d, Domain) for d in domains):
        handlers = {t: h for d in domains for t, h in d.handlers.items()}
        return type("DomainWorkerSettings", (WorkerSettings,), {"handlers": handlers})
    if isinstance(target, type) and isinstance(getattr(target, "handlers", None), dict):
        return target
    raise SystemExit(f"{path} is neither a herald.Domain nor a settings class with a handlers mapping")


async def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the worker and run it until stopped."""
    parser = argparse.ArgumentParser(prog="herald worker", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="module:domain (a herald.Domain) or module:Class (a settings class)")
    parser.add_argument("--burst", action="store_true", help="exit when no work is left")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs at once (default: HERALD_WORKER_CONCURRENCY)")
    args = parser.parse_args(argv)

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
    spec = load_worker_spec(args.target)
    if not spec.handlers:
        print(f"herald worker: {args.target} declares no handlers", file=sys.stderr)
        return 2
    broker = create_broker(settings.redis_url, **settings.broker_options())
    await broker.start()
    worker = Worker(broker, spec.handlers, **worker_options(settings, spec, concurrency=args.concurrency))
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
