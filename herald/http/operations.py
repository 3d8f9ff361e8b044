"""Operations, the polling fallback: ``GET`` (ETag, long poll, 303) and ``DELETE`` (cancel).

The 303 rule: ``GET /operations/{id}`` of an operation that succeeded and created a
resource answers ``303 See Other`` to that resource (with the status document as the
body, for clients that do not follow). ``GET /operations/{id}?view=status`` always
answers ``200`` with the status document, whatever the status.

``DELETE`` answers ``202`` with the operation once its cancel flag is set; a proxied operation's
cancel is forwarded to its upstream too (:func:`herald.http.proxy.forward_cancel`), and when the
upstream stopped at once the operation has ended: ``200``, ``canceled``.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald.broker.base import BrokerError
from herald.http.commands import RETRY_AFTER, long_poll
from herald.http.gateway import Gateway
from herald.http.problems import HTTPProblem
from herald.logs import bind_correlation_id
from herald.operations import IllegalTransition, Operation, Status

_OP_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _check_id(operation_id: str) -> None:
    if not (1 <= len(operation_id) <= 64) or not set(operation_id) <= _OP_ID_CHARS:
        raise HTTPProblem(404, "no such operation", kind="operation-not-found")


async def load_operation(request: Request, operation_id: str) -> Operation:
    """The stored operation, visible to this caller, or a 404/503 problem."""
    _check_id(operation_id)
    bind_correlation_id(operation_id)
    gateway = Gateway.of(request)
    try:
        op = await gateway.broker.get_operation(operation_id)
    except BrokerError as exc:
        raise HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                          headers={"Retry-After": "2"}) from exc
    subject = request.scope.get("herald.subject")
    if op is None or (op.owner is not None and op.owner != subject):
        raise HTTPProblem(404, f"no operation {operation_id!r} (unknown, expired, or not yours)",
                          kind="operation-not-found")
    return op


def parse_wait(raw: str | None, max_wait: float) -> float:
    """``?wait=N`` as seconds, capped; a 400 problem when it is not a number."""
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError as exc:
        raise HTTPProblem(400, "?wait= must be a number of seconds", kind="bad-wait") from exc
    if not (value >= 0) or value == float("inf"):
        raise HTTPProblem(400, "?wait= must be a non-negative number of seconds", kind="bad-wait")
    return min(value, max_wait)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (RFC 9110: a list, weak comparison, ``*``).

    Weak comparison matters: a proxy that compresses (nginx with gzip) turns the ETag into
    ``W/"..."``, and a long poll whose ETag never matched would answer at once, in a loop.
    """
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


async def get_operation(request: Request) -> Response:
    """The operation's status document (or a 303 to what it created); ``?wait=N`` long-polls."""
    gateway = Gateway.of(request)
    op = await load_operation(request, request.path_params["operation_id"])
    view = request.query_params.get("view")
    if view not in (None, "status"):
        raise HTTPProblem(400, "?view= takes only 'status'", kind="bad-view")
    wait = parse_wait(request.query_params.get("wait"), gateway.settings.max_wait)
    if wait > 0 and not op.status.terminal:
        if_none = request.headers.get("if-none-match")
        if if_none is None or etag_matches(if_none, op.etag):
            op = await long_poll(gateway, op, wait, until_terminal=False) or op  # no slot free: as it is now
    headers = {"ETag": op.etag, "Cache-Control": "no-cache"}
    if not op.status.terminal:
        headers["Retry-After"] = RETRY_AFTER
    if etag_matches(request.headers.get("if-none-match"), op.etag):
        return Response(status_code=304, headers=headers)
    body = gateway.operation_body(request, op, subject=request.scope.get("herald.subject"))
    if view is None and op.location and op.status.value == "succeeded":
        headers["Location"] = body["location"]
        return Response(orjson.dumps(body), status_code=303, headers=headers, media_type="application/json")
    return Response(orjson.dumps(body), headers=headers, media_type="application/json")


async def delete_operation(request: Request) -> Response:
    """Ask to cancel: ``202`` with the operation, or ``409`` once it has ended."""
    gateway = Gateway.of(request)
    op = await load_operation(request, request.path_params["operation_id"])
    try:
        op = await gateway.broker.request_cancel(op.id)
    except IllegalTransition as exc:
        raise HTTPProblem(409, f"the operation already ended as {op.status.value}; it cannot be canceled",
                          kind="operation-ended", status_now=op.status.value) from exc
    except BrokerError as exc:
        raise HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                          headers={"Retry-After": "2"}) from exc
    proxied = gateway.catalog.proxies.get(op.type)
    if proxied is not None and op.status is Status.RUNNING:
        from herald.http.proxy import forward_cancel  # httpx is imported only by gateways that proxy

        op = await forward_cancel(gateway, proxied, op)
    body = gateway.operation_body(request, op, subject=request.scope.get("herald.subject"))
    if op.status.terminal:
        return Response(orjson.dumps(body), headers={"ETag": op.etag}, media_type="application/json")
    return Response(orjson.dumps(body), status_code=202, headers={"Retry-After": RETRY_AFTER, "ETag": op.etag},
                    media_type="application/json")


routes = [
    Route("/operations/{operation_id}", get_operation, methods=["GET"]),
    Route("/operations/{operation_id}", delete_operation, methods=["DELETE"]),
]
