"""``create_app(settings, domains=[…])``: Herald's routes and the domains' own, and the lifespan.

``herald serve --domain pkg.mod:domain`` builds it; an application that needs more (a static
page, its own middleware) calls it itself and is served with ``herald serve --app pkg.mod:app``.
On the embedded default (no ``REDIS_URL``) the domains' handlers run inside this process; with
Redis they run in ``herald worker`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.auth import TokenSigner
from herald.broker import create_broker
from herald.domain import Catalog, Domain
from herald.http import callback, operations, push, security
from herald.http.access import TopicAccess
from herald.http.asyncapi import build_asyncapi
from herald.http.commands import CommandMiddleware, CommandRouter
from herald.http.fastwrite import HttpToolsProtocol
from herald.http.gateway import Gateway
from herald.http.mercure import MercureHub, MercureMiddleware
from herald.http.openapi import build_openapi
from herald.http.problems import HTTPProblem, handle_http_exception, handle_problem, problem_response
from herald.http.publish import PublishAuth
from herald.hub import Hub
from herald.logs import configure_logging
from herald.metrics import CONTENT_TYPE_LATEST, Metrics
from herald.settings import Settings
from herald.worker import Worker, worker_options

if TYPE_CHECKING:
    from herald.proxy.pool import UpstreamPool

log = logging.getLogger("herald.app")
GC_THRESHOLDS = (50_000, 20, 100)
"""The cycle collector's thresholds while a gateway serves (Python's default is 700, 10, 10).

Each open connection keeps a few hundred objects alive; at the default thresholds the collector walks
all of them again every few hundred allocations, so connecting 10,000 SSE clients took 20 s instead of
7 s (bench scenario A). Cycles are still collected, in bigger batches.
"""
HERALD_JS = Path(__file__).resolve().parent / "static" / "herald.js"


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


PAGE_HEADERS = [
    # the page loads its own scripts and styles and talks to its own origin (fetch, EventSource, WebSocket)
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                 b"frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
"""Headers on every static file and on ``/herald.js``: a page served by Herald runs only its own code."""


class PageHeaders:
    """ASGI wrapper adding :data:`PAGE_HEADERS` to what a static app answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve, adding the headers to the response start."""
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *PAGE_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def herald_js(request: Request) -> Response:
    """``/herald.js``: the browser client library."""
    response = FileResponse(HERALD_JS, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
    response.raw_headers.extend(PAGE_HEADERS)
    return response


def _upstream_pool(settings: Settings, catalog: Catalog) -> UpstreamPool:
    """The gateway's connections to the upstreams of proxied read routes and cancels.

    With the embedded worker running proxied commands, the settings must say where upstreams call
    back: checked here, so ``herald serve`` stops with the message rather than the worker failing later.
    """
    from herald.proxy.forward import callback_base
    from herald.proxy.pool import UpstreamPool

    if settings.embedded_worker and catalog.proxies:
        callback_base(settings)
    return UpstreamPool(default_limit=settings.proxy_concurrency, max_response=settings.proxy_max_response)


def create_app(
    settings: Settings | None = None,
    domains: Iterable[Domain] = (),
    *,
    static: str | Path | None = None,
) -> Starlette:
    """Build Herald's ASGI app serving ``domains``, from ``settings`` (default: the environment).

    ``static``: a directory served at ``/`` (``index.html`` for the directory itself), after every
    other route (an application's own page).
    """
    settings = settings or Settings.from_env()
    catalog = Catalog.of(domains)
    configure_logging(settings.log_level)
    broker = create_broker(settings.redis_url, **settings.broker_options())
    hub = Hub(broker, heartbeat=settings.heartbeat, slow_client_grace=settings.slow_client_grace)
    metrics = Metrics(hub, broker)
    broker.set_sink(metrics.sink(hub.dispatch))
    metrics.count_from("header-timeout", lambda: HttpToolsProtocol.header_timeouts)
    metrics.count_from("history-evicted", lambda: broker.evicted)
    gateway = Gateway(settings=settings, broker=broker, hub=hub,
                      signer=TokenSigner(settings.secret, ttl=settings.token_ttl), metrics=metrics)
    router = CommandRouter()
    for command in catalog.commands:
        router.add(command)
    gateway.catalog = catalog
    gateway.commands = router
    if catalog.proxies or any(domain.proxy_routes for domain in catalog.domains):
        gateway.upstreams = _upstream_pool(settings, catalog)
    gateway.access = TopicAccess(catalog, gateway.signer, subjects=settings.auth_enabled)
    publishing = PublishAuth.from_settings(settings).route()  # POST /topics/{topic}/events, with its own tokens
    openapi = orjson.dumps(build_openapi(catalog))
    asyncapi = orjson.dumps(build_asyncapi(catalog))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gc_default = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        await broker.start()
        await hub.start()
        worker_task = None
        worker = None
        if settings.embedded_worker and catalog.handlers:
            # poll bounds how long stop() waits for the blocking consume: short, so shutdown is prompt
            worker = Worker(broker, catalog.handlers, name="embedded", poll=0.1, settings=settings,
                            **worker_options(settings))
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
                await asyncio.wait([worker_task], timeout=settings.worker_grace + 1)
            if gateway.upstreams is not None:
                await gateway.upstreams.aclose()
            await broker.close()
            gc.set_threshold(*gc_default)

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    async def asyncapi_json(request: Request) -> Response:
        return Response(asyncapi, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/asyncapi.json", asyncapi_json, methods=["GET"]),
        Route("/herald.js", herald_js, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        *router.routes(),
        *operations.routes,
        *callback.routes,
        *push.routes,
        publishing,
        *(route for domain in catalog.domains for route in domain.routes),
        *security.routes,
    ]
    if static is not None:
        routes.append(Mount("/", app=PageHeaders(StaticFiles(directory=static, html=True)), name="static"))
    # outermost: the Mercure hub answers its own path with its own keys and CORS origins
    middleware = [Middleware(MercureMiddleware, hub=MercureHub.from_settings(gateway))]
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
        public = {id(route) for domain in catalog.domains for route in domain.public_routes}
        rules = security.BearerRules(
            open_routes=[*push.routes, *security.routes],
            protected_reads=[*operations.routes,
                             *(r for d in catalog.domains for r in d.routes if id(r) not in public)],
            own_auth=[publishing, *callback.routes],
        )
        middleware.append(Middleware(security.BearerAuthMiddleware, verifier=verifier, rules=rules))
    middleware.append(Middleware(push.PushMiddleware))  # innermost: streams and sockets skip the router's layers
    middleware.append(Middleware(CommandMiddleware, commands=router))  # and so do commands
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
