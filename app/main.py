"""``create_app()``: Herald's routes, and the lifespan that opens and closes the broker.

Run it with ``uvicorn app.main:create_app --factory``. On the embedded default (no
``REDIS_URL``) the chat worker runs inside this process; with Redis it runs as
``python -m app.worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from app.auth import TokenSigner
from app.broker import create_broker
from app.chat import COMMANDS as CHAT_COMMANDS
from app.chat import routes as chat_routes
from app.chat.worker import WorkerSettings as ChatWorkerSettings
from app.http import operations, push, security
from app.http.commands import CommandRouter
from app.http.gateway import Gateway
from app.http.openapi import build_openapi
from app.http.problems import HTTPProblem, handle_http_exception, handle_problem, problem_response
from app.hub import Hub
from app.logs import configure_logging
from app.metrics import CONTENT_TYPE_LATEST, Metrics
from app.settings import Settings
from app.worker import Worker

log = logging.getLogger("herald.app")
GC_THRESHOLDS = (50_000, 20, 100)
"""The cycle collector's thresholds while a gateway serves (Python's default is 700, 10, 10).

Each open connection keeps a few hundred objects alive; at the default thresholds the collector walks
all of them again every few hundred allocations, so connecting 10,000 SSE clients took 20 s instead of
7 s (bench scenario A). Cycles are still collected, in bigger batches.
"""
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


async def healthz(request: Request) -> Response:
    """The process is alive."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    """The broker answers; 503 otherwise (take this process out of rotation)."""
    gateway = Gateway.of(request)
    if not gateway.accepting:
        return problem_response(HTTPProblem(503, "shutting down", kind="shutting-down",
                                            headers={"Retry-After": "1"}))
    if not await gateway.broker.ping():
        return problem_response(HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                                            headers={"Retry-After": "2"}))
    return Response(b'{"status":"ready"}', media_type="application/json")


@contextlib.contextmanager
def drain_on_exit_signals(gateway: Gateway) -> Iterator[None]:
    """While serving: on SIGTERM/SIGINT, stop accepting and tell every push client to go, then chain on.

    uvicorn waits for open responses to finish before it runs the lifespan's shutdown, and an
    SSE stream never finishes by itself: without this a stopping gateway would hang as long as
    one EventSource stayed connected. Clients get ``herald.disconnect`` (SSE) or close 4001
    (WebSocket) with their cursor, and reconnect to another process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        gateway.accepting = False
        loop.call_soon_threadsafe(gateway.hub.shutdown)
        chained = previous[signal.Signals(signum)]
        if callable(chained):
            chained(signum, frame)
        elif chained == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """Last resort: log it, answer a problem without internals."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(HTTPProblem(500, "an unexpected error occurred; it has been logged",
                                        kind="internal-error"))


def create_app(settings: Settings | None = None) -> Starlette:
    """Build Herald's ASGI app from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    broker = create_broker(settings.redis_url, **settings.broker_options())
    hub = Hub(broker, heartbeat=settings.heartbeat, slow_client_grace=settings.slow_client_grace)
    metrics = Metrics(hub, broker)
    broker.set_sink(metrics.sink(hub.dispatch))
    gateway = Gateway(settings=settings, broker=broker, hub=hub,
                      signer=TokenSigner(settings.secret, ttl=settings.token_ttl), metrics=metrics)
    router = CommandRouter()
    for command in CHAT_COMMANDS:
        router.add(command)
    gateway.extras["commands"] = router
    openapi = orjson.dumps(build_openapi(router.commands))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gc_default = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        await broker.start()
        await hub.start()
        worker_task = None
        worker = None
        if settings.embedded_worker:
            # poll bounds how long stop() waits for the blocking consume: short, so shutdown is prompt
            worker = Worker(broker, ChatWorkerSettings.handlers, name="embedded",
                            concurrency=settings.worker_concurrency, max_attempts=settings.max_attempts,
                            poll=0.1, shutdown_grace=2.0)
            worker_task = asyncio.create_task(worker.run(), name="embedded-worker")
        log.info("herald ready", extra={"broker": "redis" if settings.redis_url else "memory",
                                        "embedded_worker": settings.embedded_worker})
        try:
            with drain_on_exit_signals(gateway):
                yield
        finally:
            gateway.accepting = False
            await hub.close()
            if worker is not None and worker_task is not None:
                worker.stop()
                await asyncio.wait([worker_task], timeout=5)
            await broker.close()
            gc.set_threshold(*gc_default)

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        *router.routes(),
        *operations.routes,
        *push.routes,
        *chat_routes.routes,
        *security.routes,
        Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="static"),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Idempotency-Key", "Prefer", "Last-Event-ID", "Authorization",
                           "If-None-Match", "traceparent"],
            expose_headers=["Location", "Retry-After", "Preference-Applied", "ETag", "Content-Location"],
            allow_credentials=True,
        ))
    verifier = security.BearerVerifier.from_settings(settings)
    if verifier is not None:  # inside CORS, so preflights are answered without a token
        middleware.append(Middleware(security.BearerAuthMiddleware, verifier=verifier))
    middleware.append(Middleware(push.PushMiddleware))  # innermost: streams and sockets skip the router's layers
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            HTTPProblem: handle_problem,
            HTTPException: handle_http_exception,
            Exception: unexpected_error,
        },
    )
    app.state.gateway = gateway
    return app
