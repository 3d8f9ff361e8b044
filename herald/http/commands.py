"""Commands: ``POST`` → ``202 Accepted``, with ``Prefer`` and ``Idempotency-Key``.

A command (:class:`herald.domain.Command`) maps a method and path to a request event type; its
schema validates the JSON body (a ``422`` problem naming the failing field) and its function
turns the path parameters and body into the event's data. :func:`submit` is the one path from a
command to an accepted operation, shared by HTTP and by commands sent over the WebSocket.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from herald.broker.base import BrokerError, BrokerUnavailable, IdempotencyConflict, IdempotencyInProgress
from herald.domain import Command
from herald.events import EventError, build_event
from herald.http.gateway import Gateway, request_header
from herald.http.limits import check_json_shape, enforce_rate_limit
from herald.http.problems import HTTPProblem, problem_response
from herald.hub import Subscriber
from herald.logs import bind_correlation_id
from herald.operations import Operation, operation_topic
from herald.schema import SchemaViolation

JSON_TYPE = re.compile(r"^application/([a-z0-9.\-]+\+)?json\s*(;.*)?$", re.IGNORECASE)
# Both matched in full: "$" alone accepts a trailing newline (possible in a WebSocket command's headers).
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
RETRY_AFTER = "1"


class CommandRouter:
    """The commands this gateway accepts, matched by path for HTTP and WebSocket alike."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self._compiled: list[tuple[re.Pattern[str], dict[str, Any], Command]] = []

    def add(self, command: Command) -> None:
        """Register a command."""
        regex, _, convertors = compile_path(command.path)
        self.commands.append(command)
        self._compiled.append((regex, convertors, command))

    def match(self, method: str, path: str) -> tuple[Command, dict[str, str]] | None:
        """The command whose method and path match, and its path parameters."""
        for regex, convertors, command in self._compiled:
            found = regex.match(path)
            if found and command.method == method:
                params = {k: convertors[k].convert(v) for k, v in found.groupdict().items()}
                return command, params
        return None

    def routes(self) -> list[Route]:
        """One Starlette route per command."""
        return [Route(c.path, _endpoint(c), methods=[c.method], name=c.event_type) for c in self.commands]


# Prefer (RFC 7240) ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Preferences:
    """The preferences of a ``Prefer`` header that Herald understands."""

    respond_async: bool = False
    wait: float | None = None


def parse_prefer(values: list[str], *, max_wait: float) -> Preferences:
    """Parse ``Prefer`` values; invalid or unknown preferences are ignored, as RFC 7240 asks."""
    respond_async = False
    wait: float | None = None
    for value in values:
        for item in value.split(","):
            token, _, raw = item.strip().partition("=")
            token = token.strip().lower()
            raw = raw.strip().strip('"')
            if token == "respond-async" and not raw:
                respond_async = True
            # isascii: isdigit() alone takes "²", which float() does not
            elif token == "wait" and raw.isascii() and raw.isdigit() and len(raw) <= 9:
                wait = min(float(raw), max_wait)
    return Preferences(respond_async=respond_async, wait=None if respond_async else wait)


# Reading a body ------------------------------------------------------------------------

async def read_json_body(request: Request, max_body: int) -> Any:
    """The request's JSON body, bounded by ``max_body`` bytes; problems for anything else."""
    content_type = request_header(request.scope, b"content-type") or ""
    if not JSON_TYPE.match(content_type):
        raise HTTPProblem(415, "commands take a JSON body: send Content-Type: application/json",
                          kind="unsupported-media-type", headers={"Accept-Post": "application/json"})
    length = request_header(request.scope, b"content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise HTTPProblem(400, "Content-Length is not a number", kind="bad-request")
        if int(length) > max_body:
            raise HTTPProblem(413, f"the body is larger than {max_body} bytes", kind="body-too-large",
                              max_body=max_body)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise HTTPProblem(413, f"the body is larger than {max_body} bytes", kind="body-too-large",
                              max_body=max_body)
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


def parse_json(raw: bytes) -> Any:
    """Decode JSON, as a 400 problem when it is not valid UTF-8 JSON."""
    if not raw:
        raise HTTPProblem(400, "the body is empty; a JSON object is expected", kind="invalid-json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg:  # well-formed, but deeper than anyone needs: the same answer as check_json_shape
            raise HTTPProblem(422, "the body nests too deep", kind="json-too-deep") from exc
        raise HTTPProblem(400, f"the body is not valid JSON: {exc.msg}", kind="invalid-json") from exc


def idempotency_scope(owner: str | None, key: str) -> str:
    """Where ``key`` lives: per owner, length-prefixed so that no subject and key can pass for another's.

    (``urn:user`` with key ``1:k1`` and ``urn:user:1`` with ``k1`` were one scope when joined by ``:``.)
    """
    if owner is None:
        return f"-:{key}"
    return f"{len(owner)}:{owner}:{key}"


def fingerprint(path: str, body: Any) -> str:
    """A digest of what makes two requests "the same" for ``Idempotency-Key``."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(path.encode() + b"\n" + canonical).hexdigest()


# Submitting ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Submission:
    """The outcome of :func:`submit`: status code, headers and body."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


async def submit(
    conn: HTTPConnection,
    command: Command,
    params: dict[str, str],
    body: Any,
    *,
    path: str,
    idempotency_key: str | None,
    prefer: Preferences,
    traceparent: str | None,
    owner: str | None,
) -> Submission:
    """Turn a parsed command into an accepted operation (or a problem), waiting if asked to."""
    gateway = Gateway.of(conn)
    if not gateway.accepting:
        raise HTTPProblem(503, "this gateway is shutting down; send the command to another",
                          kind="shutting-down", headers={"Retry-After": RETRY_AFTER})
    if gateway.settings.auth_enabled and owner is None:  # HTTP is refused earlier; this is for WebSocket commands
        raise HTTPProblem(401, "commands need Authorization: Bearer <token> (on the WebSocket: at the handshake)",
                          kind="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="herald"'})
    await enforce_rate_limit(conn, owner)
    check_json_shape(body, gateway.settings)
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise HTTPProblem(400, "Idempotency-Key must be 1-255 visible ASCII characters", kind="bad-idempotency-key")
    if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent):
        traceparent = None
    try:
        parsed = command.parse(params, body, caller=owner)
    except SchemaViolation as exc:
        extra = dict(exc.extra)
        kind = extra.pop("kind", "invalid-command")
        raise HTTPProblem(422, exc.detail, kind=kind, field=exc.field, **extra) from exc
    scoped_key = idempotency_scope(owner, idempotency_key) if idempotency_key else None
    op_id = gateway.broker.operation_id(scoped_key)  # a Redis Cluster places it in the slot of its key's record
    try:
        request_event = build_event(
            command.event_type,
            parsed.data,
            source=f"herald{path}",
            subject=parsed.subject,
            correlationid=op_id,
            traceparent=traceparent,
        )
    except EventError as exc:
        raise HTTPProblem(422, str(exc), kind="invalid-command") from exc
    operation = Operation(id=op_id, type=command.event_type, owner=owner, request_event_id=request_event.id)
    try:
        accepted = await gateway.broker.accept(
            operation,
            request_event,
            idempotency_key=scoped_key,
            fingerprint=fingerprint(path, body) if scoped_key else None,
        )
    except IdempotencyConflict as exc:
        # the other operation is named only to its owner: anonymous callers share one key space
        known: dict[str, Any] = {"operation_id": exc.operation_id} if owner is not None else {}
        raise HTTPProblem(422, "this Idempotency-Key was already used with a different request",
                          kind="idempotency-key-reused", **known) from exc
    except IdempotencyInProgress as exc:
        raise HTTPProblem(409, "a request with this Idempotency-Key is still being accepted; ask again shortly",
                          kind="idempotency-key-in-progress", headers={"Retry-After": "1"}) from exc
    except BrokerError as exc:
        raise HTTPProblem(503, "the broker is unreachable; the command was not accepted",
                          kind="broker-unavailable", headers={"Retry-After": "2"}) from exc
    op = accepted.operation
    bind_correlation_id(op.id)
    if accepted.created and gateway.metrics is not None:
        gateway.metrics.accepted(op.id)
    headers: dict[str, str] = {}
    if prefer.respond_async:
        headers["Preference-Applied"] = "respond-async"
    elif prefer.wait is not None:
        waited = await long_poll(gateway, op, prefer.wait, until_terminal=True)
        if waited is not None:  # else no slot was free: answered at once, the preference not applied
            headers["Preference-Applied"] = f"wait={int(prefer.wait)}"
            op = waited
    if not accepted.created:
        headers["Idempotent-Replayed"] = "true"
    body_out = gateway.operation_body(conn, op, subject=owner)
    if op.status.terminal:
        headers["Content-Location"] = body_out["operation_url"]
        return Submission(200, headers, body_out)
    headers["Location"] = body_out["operation_url"]
    headers["Retry-After"] = RETRY_AFTER
    return Submission(202, headers, body_out)


async def long_poll(gateway: Gateway, op: Operation, timeout: float, *, until_terminal: bool) -> Operation | None:
    """:func:`wait_for_change` in one of the ``HERALD_MAX_LONG_POLLS`` slots; ``None`` when none is free.

    A request that gets no slot is answered at once, as if it had not asked to wait (a command is
    never refused for its wait), and counted as ``long-polls`` in ``herald_limited_total``.
    """
    if timeout <= 0 or op.status.terminal:
        return op  # nothing to wait for: no slot needed
    admission = gateway.admission
    if not admission.begin_long_poll(gateway.settings.max_long_polls):
        if gateway.metrics is not None:
            gateway.metrics.limited("long-polls")
        return None
    try:
        return await wait_for_change(gateway, op, timeout, until_terminal=until_terminal)
    finally:
        admission.end_long_poll()


async def wait_for_change(gateway: Gateway, op: Operation, timeout: float, *, until_terminal: bool) -> Operation:
    """The operation once it changes (or ends, with ``until_terminal``), or as it is after ``timeout``."""
    if timeout <= 0 or op.status.terminal:
        return op
    deadline = time.monotonic() + timeout
    sub = Subscriber(max_queue=64, transport="wait")
    topic = operation_topic(op.id)
    try:
        await gateway.hub.follow(sub, topic, None, from_start=False)
        current = await gateway.broker.get_operation(op.id) or op
        while not _changed(op, current, until_terminal):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch = await sub.next_batch()
            except TimeoutError:
                break
            if not batch:
                break
            if any(getattr(f, "type", "").startswith("herald.operation.") for f in batch):
                current = await gateway.broker.get_operation(op.id) or current
        return current
    except BrokerUnavailable:
        return op
    finally:
        await gateway.hub.leave(sub)


def _changed(before: Operation, now: Operation, until_terminal: bool) -> bool:
    if until_terminal:
        return now.status.terminal
    return now.version != before.version


async def serve(request: Request, command: Command, params: dict[str, str]) -> Response:
    """Answer one command request: its JSON body submitted, the operation (or a problem raised as HTTPProblem)."""
    gateway = Gateway.of(request)
    body = await read_json_body(request, gateway.settings.max_body)
    scope = request.scope
    prefer = request.headers.getlist("prefer") if request_header(scope, b"prefer") is not None else []
    result = await submit(
        request,
        command,
        params,
        body,
        path=_url_path(scope),
        idempotency_key=request_header(scope, b"idempotency-key"),
        prefer=parse_prefer(prefer, max_wait=gateway.settings.max_wait),
        traceparent=request_header(scope, b"traceparent"),
        owner=scope.get("herald.subject"),
    )
    return Response(orjson.dumps(result.body), status_code=result.status, headers=result.headers,
                    media_type="application/json")


def _url_path(scope: Scope) -> str:
    """``request.url.path`` without building the URL (``urlsplit`` of a URL put together for it)."""
    return scope["path"].replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def _endpoint(command: Command) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        return await serve(request, command, dict(request.path_params))

    endpoint.__name__ = f"post_{command.event_type}"
    endpoint.__doc__ = command.summary
    return endpoint


class CommandMiddleware:
    """Serves the commands' requests before Starlette's router does, as :class:`~herald.http.push.PushMiddleware`
    serves the streams.

    A command is the hottest request a gateway answers. Through the router it paid for the router's
    walk over every route, the route's request/response wrapper and the exception-handling layer
    around it: a tenth of the gateway's CPU per command (bench scenario S). Installed innermost
    (inside CORS and bearer authentication, so both still apply), this matches the method and path
    against the commands alone and answers them itself; problems are answered as the app's exception
    handler would, anything else propagates to Starlette's ServerErrorMiddleware. The routes stay in
    :meth:`CommandRouter.routes`, so an app without this middleware serves the same commands.
    """

    def __init__(self, app: ASGIApp, commands: CommandRouter) -> None:
        self.app = app
        self.commands = commands

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a command, or hand the request on."""
        # under a root path the router's own matching is left to do it (it strips the prefix first)
        if scope["type"] == "http" and scope["method"] != "GET" and not scope.get("root_path"):
            found = self.commands.match(scope["method"], scope["path"])
            if found is not None:
                command, params = found
                try:
                    response = await serve(Request(scope, receive), command, params)
                except HTTPProblem as exc:
                    response = problem_response(exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
