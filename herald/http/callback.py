"""The callback API: how an upstream of the command proxy reports on the operation it was forwarded.

Both calls carry ``Authorization: Bearer <the Herald-Callback-Token it was sent>``, a token for that
one operation (:meth:`herald.auth.TokenSigner.issue_callback`): no token or a bad one is ``401``,
another operation's ``403``. The bearer middleware leaves these routes alone (they check their own
token), and bodies are bounded as published events are (``HERALD_PUBLISH_MAX_BODY``, ``_BATCH``, ``_EVENT``).

``POST /operations/{id}/events``: CloudEvents JSON, one event or a list of them (``type`` and ``id``
required; ``specversion``, ``source``, ``time`` filled in when missing). Each event goes to the
operation's topic and to the topics its ``topics`` attribute names (a list, or a string of names
separated by commas or spaces): each of those must be one the token allows, the ones the command
declares, or the whole call is ``403``. ``topics`` is Herald's routing, not published; the events get
the operation's ``correlationid`` (another is ``422``) and, unless they say, the request event as
``causationid``. Idempotent by event id: an id already published for this operation is not published
again (``"duplicate": true`` in the answer). Events for an operation that has ended are ``409``, unless
all of them were published already.

``POST /operations/{id}/result``: ``{"status": "succeeded", "result": …, "location": "/…"}``,
``{"status": "failed", "error": <problem>}``, or ``{"status": "canceled"}`` (after a cancel Herald
forwarded), ending the operation; ``200`` with the operation. A late or repeated result, once the
operation has ended, is ``409`` and changes nothing.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald.auth import CallbackGrant, TokenError
from herald.broker.base import BrokerError, OperationNotFound
from herald.events import Event, EventError, event_from_dict
from herald.http.commands import read_json_body
from herald.http.gateway import Gateway
from herald.http.limits import check_json_shape
from herald.http.problems import HTTPProblem
from herald.logs import bind_correlation_id
from herald.operations import IllegalTransition, Operation, Status, operation_topic
from herald.protocol import ProtocolError, validate_topic
from herald.proxy.outcome import location_path

SEEN_PREFIX = "herald-callback-seen/"
"""Broker resources ``herald-callback-seen/<operation>/<event id>``: the events a callback published."""
MAX_EVENT_ID = 256
_OP_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_TOPIC_SPLIT = re.compile(r"[\s,]+")
_RESULT_KEYS = frozenset({"status", "result", "error", "location"})
_ENDINGS = {"succeeded": Status.SUCCEEDED, "failed": Status.FAILED, "canceled": Status.CANCELED}


def _grant(request: Request) -> CallbackGrant:
    """The verified callback token of the request, for the operation in its path; a 401 or 403 problem."""
    operation_id = request.path_params["operation_id"]
    if not _OP_ID.fullmatch(operation_id):
        raise HTTPProblem(404, "no such operation", kind="operation-not-found")
    bind_correlation_id(operation_id)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    try:
        return Gateway.of(request).signer.verify_callback(token.strip(), operation_id)
    except TokenError as exc:
        challenge = 'Bearer realm="herald-callback"' + (', error="invalid_token"' if token else "")
        raise HTTPProblem(exc.status, exc.detail, kind="unauthorized" if exc.status == 401 else "forbidden-token",
                          headers={"WWW-Authenticate": challenge}) from exc


async def _operation(gateway: Gateway, operation_id: str) -> Operation:
    try:
        op = await gateway.broker.get_operation(operation_id)
    except BrokerError as exc:
        raise _unavailable() from exc
    if op is None:
        raise HTTPProblem(404, f"no operation {operation_id!r} (unknown or expired)", kind="operation-not-found")
    return op


async def post_events(request: Request) -> Response:
    """``POST /operations/{id}/events``: publish the upstream's events about the operation."""
    grant = _grant(request)
    gateway = Gateway.of(request)
    settings = gateway.settings
    body = await read_json_body(request, settings.publish_max_body)
    op = await _operation(gateway, grant.operation_id)
    routed = build_events(body, op, grant, max_batch=settings.publish_max_batch, max_event=settings.publish_max_event,
                          check=lambda doc: check_json_shape(doc, settings))
    broker = gateway.broker
    paths = [f"{SEEN_PREFIX}{op.id}/{event.id}" for event, _ in routed]
    if op.status.terminal:
        try:
            seen = [await broker.get_resource(path) is not None for path in paths]
        except BrokerError as exc:
            raise _unavailable() from exc
        if not all(seen):
            raise _ended(op)
        return _json({"events": [{"id": event.id, "duplicate": True} for event, _ in routed]})
    claim = secrets.token_urlsafe(12)
    fresh: list[int] = []
    try:
        for index, path in enumerate(paths):
            mine = f"{claim}.{index}"  # one claim per item: an id twice in one batch is published once
            stored = await broker.put_resource_if_absent(path, {"claim": mine}, ttl=settings.operation_ttl)
            if stored.get("released"):  # a call that failed to publish it let go: this one takes it over
                stored = await broker.update_resource(path, functools.partial(_take_over, mine),
                                                      ttl=settings.operation_ttl) or {}
            if stored.get("claim") == mine:
                fresh.append(index)
        items = [(topic, routed[i][0]) for i in fresh for topic in routed[i][1]]
        cursors = await broker.publish_many(items) if items else []
    except BrokerError as exc:
        for i in fresh:  # let a retry publish them (the shortest life a resource can have)
            try:
                await broker.put_resource(paths[i], {"released": True}, ttl=1)
            except BrokerError:
                break
        raise _unavailable() from exc
    cursor_of: dict[int, str] = {}
    position = 0
    for i in fresh:
        cursor_of[i] = cursors[position]  # the operation's topic comes first for each event
        position += len(routed[i][1])
    answer = [{"id": event.id, "duplicate": i not in cursor_of, **({"cursor": cursor_of[i]} if i in cursor_of else {})}
              for i, (event, _) in enumerate(routed)]
    return _json({"events": answer})


def _take_over(claim: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    return {"claim": claim} if doc.get("released") else None


def build_events(
    body: Any, op: Operation, grant: CallbackGrant, *, max_batch: int, max_event: int, check: Callable[[Any], None]
) -> list[tuple[Event, list[str]]]:
    """Each event of a callback body with the topics it goes to (the operation's first); 4xx problems."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise HTTPProblem(422, "the batch is empty; send at least one event", kind="empty-batch")
    if len(items) > max_batch:
        raise HTTPProblem(422, f"a batch holds at most {max_batch} events; this one has {len(items)}",
                          kind="batch-too-large", max_batch=max_batch)
    out: list[tuple[Event, list[str]]] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _invalid(index, "an event must be a JSON object")
        check(item)
        doc = {"specversion": "1.0", "source": f"herald/callback/{op.id}", **item}
        topics = _topics(doc.pop("topics", None), index, grant)
        if not isinstance(doc.get("id"), str) or not doc["id"] or len(doc["id"]) > MAX_EVENT_ID:
            raise _invalid(index, f"'id' is required (1-{MAX_EVENT_ID} characters): a retried call is "
                                  "recognised by its events' ids")
        if doc.setdefault("correlationid", op.id) != op.id:
            raise _invalid(index, f"'correlationid' must be this operation's id, {op.id!r}")
        if op.request_event_id is not None:
            doc.setdefault("causationid", op.request_event_id)
        try:
            event = event_from_dict(doc)
        except EventError as exc:
            raise _invalid(index, str(exc)) from exc
        if len(event.encoded) > max_event:
            raise HTTPProblem(422, f"event {index} is {len(event.encoded)} bytes encoded; at most {max_event}",
                              kind="event-too-large", index=index, max_event=max_event)
        out.append((event, [operation_topic(op.id), *topics]))
    return out


def _topics(raw: Any, index: int, grant: CallbackGrant) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        names = [t for t in _TOPIC_SPLIT.split(raw) if t]
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        names = list(raw)
    else:
        raise _invalid(index, "'topics' must be a list of topic names, or a string of them")
    for name in names:
        try:
            validate_topic(name)
        except ProtocolError as exc:
            raise _invalid(index, f"topic {name[:100]!r}: {exc}") from exc
        if name not in grant.topics:
            raise HTTPProblem(403, f"event {index}: this callback token does not open the topic {name!r}",
                              kind="forbidden-topic", index=index)
    return list(dict.fromkeys(names))


async def post_result(request: Request) -> Response:
    """``POST /operations/{id}/result``: end the operation as the upstream reports."""
    grant = _grant(request)
    gateway = Gateway.of(request)
    body = await read_json_body(request, gateway.settings.publish_max_body)
    check_json_shape(body, gateway.settings)
    status, fields = parse_result(body)
    op = await _operation(gateway, grant.operation_id)
    if op.status.terminal:
        raise _ended(op)
    try:
        op = await gateway.broker.transition(op.id, status, current=op, **fields)
    except IllegalTransition as exc:
        raise _ended(await _operation(gateway, op.id)) from exc
    except OperationNotFound as exc:
        raise HTTPProblem(404, f"no operation {op.id!r} (expired)", kind="operation-not-found") from exc
    except BrokerError as exc:
        raise _unavailable() from exc
    return _json(gateway.operation_body(request, op))


def parse_result(body: Any) -> tuple[Status, dict[str, Any]]:
    """The status and the transition's fields of a result body; a ``422`` problem for anything else."""
    if not isinstance(body, dict) or not _RESULT_KEYS.issuperset(body):
        raise HTTPProblem(422, 'a result is {"status": "succeeded"|"failed"|"canceled", "result"|"error", '
                               '"location"}', kind="invalid-result")
    status = _ENDINGS.get(body.get("status"))  # type: ignore[arg-type]
    if status is None:
        raise HTTPProblem(422, "'status' must be succeeded, failed or canceled", kind="invalid-result",
                          field="status")
    if status is Status.SUCCEEDED:
        if "error" in body:
            raise HTTPProblem(422, "a succeeded result has no 'error'", kind="invalid-result", field="error")
        raw_location = body.get("location")
        location = location_path(raw_location) if isinstance(raw_location, str) else None
        if raw_location is not None and location is None:
            raise HTTPProblem(422, "'location' must be a path of this gateway's API, starting with '/'",
                              kind="invalid-result", field="location")
        return status, {"result": body.get("result"), "location": location}
    if "result" in body or "location" in body:
        raise HTTPProblem(422, f"a {status.value} result has no 'result' nor 'location'", kind="invalid-result")
    error = body.get("error")
    if error is None:
        return status, {}
    if not isinstance(error, dict):
        raise HTTPProblem(422, "'error' must be a problem document (RFC 9457)", kind="invalid-result", field="error")
    problem = {"type": "about:blank", "title": "The upstream reported a failure", "status": 500, **error}
    if not isinstance(problem["title"], str) or not isinstance(problem["status"], int):
        raise HTTPProblem(422, "'error' has a 'title' string and an integer 'status'", kind="invalid-result",
                          field="error")
    return status, {"error": problem}


def _ended(op: Operation) -> HTTPProblem:
    return HTTPProblem(409, f"the operation has ended as {op.status.value}; nothing was changed",
                       kind="operation-ended", status_now=op.status.value)


def _invalid(index: int, detail: str) -> HTTPProblem:
    return HTTPProblem(422, f"event {index}: {detail}", kind="invalid-event", index=index)


def _unavailable() -> HTTPProblem:
    return HTTPProblem(503, "the broker is unreachable; call again later", kind="broker-unavailable",
                       headers={"Retry-After": "2"})


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc), media_type="application/json", headers={"Cache-Control": "no-store"})


routes = [
    Route("/operations/{operation_id}/events", post_events, methods=["POST"], name="callback-events"),
    Route("/operations/{operation_id}/result", post_result, methods=["POST"], name="callback-result"),
]
"""The callback API's routes; each checks its own token (``BearerRules(own_auth=…)``)."""
