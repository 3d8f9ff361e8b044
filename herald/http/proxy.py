"""The gateway's side of the command proxy: read routes answered by an upstream, and cancels forwarded to one.

A proxied read route (``Domain.proxy_route``, ``[[route]]`` in a config file) sends the request's
``GET`` (or ``HEAD``), query string included, to its upstream URL and passes the answer on: its
status, its body and the headers a cache or a client needs. A few request headers go along
(``Accept``, conditional ones, ``traceparent``) and, with bearer authentication on, the caller's
subject as ``Herald-Subject``; never the caller's ``Authorization``. No answer in time is ``504``,
no connection ``502``, both as problems.

``DELETE /operations/{id}`` on a running proxied operation also sends ``DELETE`` to the cancel URL
the upstream gave (its ``202``'s ``Herald-Cancel``) or the command declares (``cancel``). An
upstream that answers ``200`` or ``204`` has stopped: the operation ends ``canceled`` at once. Any
other answer (``202``: it reports through the callback API) leaves it cancel-requested, as for
any operation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
from starlette.requests import Request
from starlette.responses import Response

from herald.broker.base import BrokerError, OperationNotFound
from herald.http.gateway import Gateway
from herald.http.problems import HTTPProblem
from herald.operations import IllegalTransition, Operation, Status
from herald.proxy.forward import RESOURCE_PREFIX
from herald.proxy.outcome import location_path
from herald.proxy.pool import AnswerTooLarge, UpstreamPool
from herald.proxy.spec import ProxyCommand, ProxyRoute, origin

log = logging.getLogger("herald.proxy")

FORWARDED_HEADERS = ("accept", "accept-language", "if-none-match", "if-modified-since", "traceparent")
"""Request headers a proxied read passes on to the upstream."""
ANSWER_HEADERS = ("content-type", "content-language", "etag", "last-modified", "cache-control", "expires",
                  "retry-after", "vary")
"""Answer headers a proxied read passes on to the client (``Location`` too, when it is a path)."""


def upstream_pool(gateway: Gateway) -> UpstreamPool:
    """The gateway's upstream pool (``create_app`` makes one when a domain proxies)."""
    if gateway.upstreams is None:
        raise HTTPProblem(500, "this gateway has no upstream connections", kind="proxy-misconfigured")
    return gateway.upstreams


def reverse_proxy(spec: ProxyRoute) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of a proxied read route."""

    async def endpoint(request: Request) -> Response:
        pool = upstream_pool(Gateway.of(request))
        url = spec.upstream_url({name: str(value) for name, value in request.path_params.items()})
        if request.url.query:
            url += ("&" if "?" in url else "?") + request.url.query
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        subject = request.scope.get("herald.subject")
        if subject is not None:
            headers["herald-subject"] = subject
        try:
            answer = await pool.send(request.method, url, origin=spec.origin, headers=headers, timeout=spec.timeout)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise HTTPProblem(504, f"the upstream did not answer within {spec.timeout:g} s",
                              kind="upstream-timeout") from exc
        except httpx.TransportError as exc:
            log.warning("proxied read %s: %r", spec.origin, exc)
            raise HTTPProblem(502, "the upstream could not be reached", kind="upstream-unreachable",
                              headers={"Retry-After": "2"}) from exc
        except AnswerTooLarge as exc:
            raise HTTPProblem(502, "the upstream's answer is too long", kind="upstream-answer-too-long") from exc
        passed = {name: answer.headers[name] for name in ANSWER_HEADERS if name in answer.headers}
        location = location_path(answer.headers.get("location"))
        if location is not None:
            passed["location"] = location
        return Response(answer.body, status_code=answer.status, headers=passed)

    endpoint.__name__ = f"proxy_{spec.path.strip('/').replace('/', '_') or 'root'}"
    endpoint.__doc__ = f"Answered by GET {spec.upstream}."
    return endpoint


async def forward_cancel(gateway: Gateway, spec: ProxyCommand, op: Operation) -> Operation:
    """Send ``DELETE`` to the operation's cancel URL, if it has one; the operation after the upstream's answer."""
    if gateway.upstreams is None or op.status is not Status.RUNNING:
        return op  # a pending operation has not reached the upstream: the worker ends it canceled unrun
    try:
        doc = await gateway.broker.get_resource(RESOURCE_PREFIX + op.id)
    except BrokerError:
        return op
    url = doc.get("cancel") if doc else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return op
    try:
        answer = await gateway.upstreams.send("DELETE", url, origin=origin(url), timeout=spec.timeout,
                                              headers={"herald-operation": op.id})
    except (TimeoutError, httpx.HTTPError, AnswerTooLarge) as exc:
        log.warning("could not forward the cancel of %s: %r", op.id, exc, extra={"correlation_id": op.id})
        return op
    if answer.status not in (200, 204):
        return op  # 202: the upstream reports the end through the callback API; else it did not cancel
    try:
        return await gateway.broker.transition(op.id, Status.CANCELED, current=op)
    except (IllegalTransition, OperationNotFound):  # it ended meanwhile (or expired): show what it is now
        try:
            return await gateway.broker.get_operation(op.id) or op
        except BrokerError:
            return op
    except BrokerError:
        return op
