"""``POST /topics/{topic}/events``: any backend publishes CloudEvents onto a topic over HTTP.

The body is one CloudEvents JSON event or a JSON array of them (a batch). Missing ``specversion``,
``id``, ``time`` and ``source`` are filled in (``source``: ``herald/publish/<subject>``); ``type``
is required. The events are appended to the topic's history and fanned out exactly as a worker's
(:meth:`~herald.broker.base.Broker.publish_many`, one round trip per batch), and the answer is
``200`` with each event's id and cursor.

Who may publish: a bearer JWT (:class:`PublishAuth`) whose ``herald.publish`` claim lists topic
patterns (:func:`compile_pattern`), signed with ``HERALD_PUBLISH_JWT_SECRET`` /
``HERALD_PUBLISH_JWT_PUBLIC_KEY`` or, when neither is set, with the ``HERALD_JWT_*`` keys. Never
anonymous. ``operations/…`` topics are refused to everyone: they are the workers' and the
callback API's.

Limits: ``HERALD_PUBLISH_MAX_BODY`` (413), ``HERALD_PUBLISH_MAX_BATCH`` and
``HERALD_PUBLISH_MAX_EVENT`` (422, naming the event's index), ``HERALD_PUBLISH_RATE`` events per
publisher per second on every gateway (429). ``Idempotency-Key`` makes a retried batch land once:
the first call's ids and cursors are kept per publisher and key (:func:`herald.http.commands.idempotency_scope`)
for ``HERALD_HISTORY_TTL``, and a retry with the same body gets them back with
``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald.broker.base import Broker, BrokerError
from herald.events import Event, EventError, event_from_dict, new_event_id
from herald.http.commands import IDEMPOTENCY_KEY, JSON_TYPE, fingerprint, idempotency_scope, read_json_body
from herald.http.gateway import Gateway
from herald.http.limits import RATE_WINDOW, check_json_shape
from herald.http.problems import HTTPProblem
from herald.http.security import BearerError, BearerVerifier
from herald.protocol import ProtocolError, validate_topic
from herald.settings import Settings

CLAIM = "herald.publish"
"""The JWT claim listing the topic patterns a token may publish to (``{"herald": {"publish": […]}}``)."""
RESERVED_PREFIXES = ("operations/",)
"""Topics no publisher token opens: an operation's events come from its worker and the callback API."""
IDEMPOTENCY_LEASE = 10
"""Seconds a publish holds its ``Idempotency-Key`` while it stores the batch; a retry meanwhile gets ``409``."""
ACCEPT_POST = "application/json, application/cloudevents+json, application/cloudevents-batch+json"
_SEGMENT = re.compile(r"[A-Za-z0-9_\-.:@]{1,128}")
_TEMPLATE = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_MAX_PATTERNS = 100
VERIFIED_TOKENS = 256
"""Publisher tokens remembered once verified, until their ``exp`` (a backend sends the same token again and
again, and verifying a JWT costs more CPU than storing a small batch)."""


class PatternError(ValueError):
    """A ``herald.publish`` pattern that is not one; the message says why."""


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regex of one ``herald.publish`` pattern; :class:`PatternError` if it is malformed.

    A pattern is ``/``-separated segments, each one of:

    * a literal segment (topic characters): that segment exactly;
    * ``*`` or a template ``{name}``: exactly one segment, whatever it is;
    * ``**``, as the last segment only: one or more segments.

    So ``rooms/*`` and ``rooms/{room}`` open ``rooms/lobby`` but not ``rooms`` nor ``rooms/a/b``;
    ``rooms/**`` opens both ``rooms/lobby`` and ``rooms/a/b``; ``**`` opens every topic.
    """
    segments = pattern.split("/")
    if not pattern or len(pattern) > 256 or len(segments) > 8:
        raise PatternError(f"{pattern[:40]!r} is not a topic pattern (1-256 characters, up to 8 segments)")
    parts = []
    for i, segment in enumerate(segments):
        if segment == "**" and i == len(segments) - 1:
            parts.append(r"[^/]+(?:/[^/]+)*")
        elif segment == "*" or _TEMPLATE.fullmatch(segment):
            parts.append(r"[^/]+")
        elif _SEGMENT.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            raise PatternError(f"{pattern[:40]!r}: segment {segment[:40]!r} is not a name, '*', '{{name}}' "
                               "or a final '**'")
    return re.compile("/".join(parts))


def publish_patterns(claims: dict[str, Any]) -> list[str] | None:
    """The topic patterns of a token's claims, ``None`` when it has no ``herald.publish`` claim.

    Either ``{"herald": {"publish": […]}}`` (as Mercure nests ``mercure.publish``) or a flat
    ``"herald.publish"`` key; a token with both is refused (:class:`PatternError`), as is a claim
    that is not a list of valid patterns.
    """
    nested = claims.get("herald")
    nested_value = nested.get("publish") if isinstance(nested, dict) else None
    flat_value = claims.get(CLAIM)
    if nested_value is not None and flat_value is not None:
        raise PatternError(f"the token has both a nested and a flat {CLAIM} claim; keep one")
    value = nested_value if nested_value is not None else flat_value
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > _MAX_PATTERNS or not all(isinstance(p, str) for p in value):
        raise PatternError(f"the {CLAIM} claim must be a list of at most {_MAX_PATTERNS} topic patterns")
    for pattern in value:
        compile_pattern(pattern)
    return value


def allows(patterns: Sequence[str], topic: str) -> bool:
    """Whether one of ``patterns`` (already checked by :func:`publish_patterns`) opens ``topic``."""
    return any(compile_pattern(p).fullmatch(topic) for p in patterns)


class PublishAuth:
    """Verifies publisher tokens: their signature (a :class:`BearerVerifier`) and their ``herald.publish`` claim."""

    def __init__(self, verifier: BearerVerifier | None, *, missing: str) -> None:
        self.verifier = verifier
        self.missing = missing
        """Why every publish is refused when no key is configured (names the setting to set)."""
        self._verified: OrderedDict[str, tuple[float, str, list[str] | None]] = OrderedDict()
        """token → (its ``exp``, subject, patterns), least recently used first."""

    @classmethod
    def from_settings(cls, settings: Settings) -> PublishAuth:
        """The publisher keys when set, else the ``HERALD_JWT_*`` keys, else none (every publish is a 401)."""
        verifier: BearerVerifier | None
        if settings.publish_jwt_secret or settings.publish_jwt_public_key:
            verifier = BearerVerifier(secret=settings.publish_jwt_secret, public_key=settings.publish_jwt_public_key,
                                      audience=settings.jwt_audience, issuer=settings.jwt_issuer,
                                      key_setting="HERALD_PUBLISH_JWT_PUBLIC_KEY")
        elif settings.auth_enabled:
            verifier = BearerVerifier.from_settings(settings)
        else:
            verifier = None
        return cls(verifier, missing="publishing needs a key to verify publisher tokens with: set "
                                     "HERALD_PUBLISH_JWT_SECRET (or HERALD_PUBLISH_JWT_PUBLIC_KEY, or "
                                     "HERALD_JWT_SECRET)")

    def authorize(self, authorization: str | None, topic: str) -> str:
        """The publisher's subject if ``authorization`` may publish to ``topic``; a 401 or 403 problem otherwise."""
        if self.verifier is None:
            raise _unauthorized(self.missing, invalid=False)
        if authorization is None:
            raise _unauthorized("publishing needs Authorization: Bearer <publisher token>", invalid=False)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("use Authorization: Bearer <publisher token>", invalid=True)
        subject, patterns = self._verify(token)
        if patterns is None:
            raise _forbidden(f"this token has no {CLAIM} claim: it may not publish")
        if not allows(patterns, topic):
            raise _forbidden(f"this token's {CLAIM} claim does not open the topic {topic!r}")
        return subject

    def _verify(self, token: str) -> tuple[str, list[str] | None]:
        """The subject and patterns of a valid token, from the cache while it has not expired."""
        assert self.verifier is not None
        cache = self._verified
        known = cache.get(token)
        if known is not None and known[0] > time.time():
            cache.move_to_end(token)
            return known[1], known[2]
        try:
            claims = self.verifier.claims(token)  # past its exp, it is verified again: the leeway, then a 401
        except BearerError as exc:
            cache.pop(token, None)
            raise _unauthorized(exc.detail, invalid=True) from exc
        try:
            patterns = publish_patterns(claims)
        except PatternError as exc:
            raise _forbidden(str(exc)) from exc
        subject: str = claims["sub"]
        expires_at = claims["exp"]
        if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
            cache[token] = (float(expires_at), subject, patterns)
            cache.move_to_end(token)
            while len(cache) > VERIFIED_TOKENS:
                cache.popitem(last=False)
        return subject, patterns

    async def endpoint(self, request: Request) -> Response:
        """``POST /topics/{topic}/events``."""
        gateway = Gateway.of(request)
        settings = gateway.settings
        topic = request.path_params["topic"]
        try:
            validate_topic(topic)
        except ProtocolError as exc:
            raise HTTPProblem(400, str(exc), kind="bad-topic") from exc
        if topic.startswith(RESERVED_PREFIXES):
            raise HTTPProblem(403, "operations/… topics take events only from their worker and the callback API",
                              kind="reserved-topic")
        subject = self.authorize(request.headers.get("authorization"), topic)
        key = request.headers.get("idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            raise HTTPProblem(400, "Idempotency-Key must be 1-255 visible ASCII characters", kind="bad-idempotency-key")
        if not JSON_TYPE.match(request.headers.get("content-type", "")):
            raise HTTPProblem(415, "publish a CloudEvents JSON event or a JSON array of them: send "
                                   "Content-Type: application/json (or application/cloudevents+json)",
                              kind="unsupported-media-type", headers={"Accept-Post": ACCEPT_POST})
        body = await read_json_body(request, settings.publish_max_body)
        events = build_events(body, subject=subject, settings=settings)
        await enforce_publish_rate(gateway, subject, len(events))
        if key is None:
            published = await _publish(gateway.broker, topic, events)
            return _answer(published, replayed=False)
        record = _IdempotencyRecord(gateway.broker, idempotency_scope(subject, key),
                                    fingerprint(request.url.path, body))
        replay = await record.claim()
        if replay is not None:
            return _answer(replay, replayed=True)
        try:
            published = await _publish(gateway.broker, topic, events)
        except HTTPProblem:
            await record.release()
            raise
        await record.complete(published, ttl=settings.history_ttl)
        return _answer(published, replayed=False)

    def route(self) -> Route:
        """The route serving :meth:`endpoint`."""
        return Route("/topics/{topic:path}/events", self.endpoint, methods=["POST"], name="publish")


def build_events(body: Any, *, subject: str, settings: Settings) -> list[Event]:
    """The events of a publish body (one event or a batch), defaults filled in; ``422`` naming the bad one's index."""
    items = body if isinstance(body, list) else [body]
    limit = settings.publish_max_batch
    if settings.publish_rate > 0 and settings.publish_rate < limit:
        limit = settings.publish_rate  # a batch bigger than the rate could never pass
    if not items:
        raise HTTPProblem(422, "the batch is empty; send at least one event", kind="empty-batch")
    if len(items) > limit:
        raise HTTPProblem(422, f"a batch holds at most {limit} events; this one has {len(items)}",
                          kind="batch-too-large", max_batch=limit)
    source = "herald/publish/" + quote(subject, safe="")
    events = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _invalid(index, "an event must be a JSON object")
        try:
            check_json_shape(item, settings)
        except HTTPProblem as exc:
            raise HTTPProblem(exc.status, f"event {index}: {exc.detail}", kind=exc.kind, index=index,
                              **exc.extra) from exc
        doc = {"specversion": "1.0", "id": new_event_id(), "source": source, **item}
        try:
            event = event_from_dict(doc)
        except EventError as exc:
            raise _invalid(index, str(exc)) from exc
        size = len(event.encoded)
        if size > settings.publish_max_event:
            raise HTTPProblem(422, f"event {index} is {size} bytes encoded; at most {settings.publish_max_event}",
                              kind="event-too-large", index=index, max_event=settings.publish_max_event)
        events.append(event)
    return events


async def enforce_publish_rate(gateway: Gateway, subject: str, count: int) -> None:
    """Count ``count`` events for this publisher; a ``429`` with ``Retry-After`` once over ``HERALD_PUBLISH_RATE``."""
    limit = gateway.settings.publish_rate
    if limit <= 0:
        return
    now = time.time()
    window = int(now // RATE_WINDOW)
    try:
        total = await gateway.broker.hit(f"publish:{len(subject)}:{subject}:{window}", RATE_WINDOW, count)
    except BrokerError:
        return  # fail open: publishing itself needs the broker and answers 503 if it is gone
    if total > limit:
        if gateway.metrics is not None:
            gateway.metrics.limited("publish-rate")
        retry_after = max(1, math.ceil((window + 1) * RATE_WINDOW - now))
        raise HTTPProblem(429, f"more than {limit} events per second from this publisher; slow down",
                          kind="publish-rate-limited", headers={"Retry-After": str(retry_after)}, limit=limit)


class _IdempotencyRecord:
    """One publisher's ``Idempotency-Key``: claimed for a lease, then holding the first batch's ids and cursors.

    Kept as a broker resource (``put_resource_if_absent``: atomic, one round trip), so every gateway
    on the same Redis sees it.
    """

    def __init__(self, broker: Broker, scope: str, fingerprint: str) -> None:
        self.broker = broker
        self.path = "herald-publish-idempotency/" + scope
        self.fingerprint = fingerprint
        self.nonce = secrets.token_urlsafe(12)

    async def claim(self) -> list[dict[str, str]] | None:
        """Take the key (``None``), or the first batch's answer to replay; ``409`` or ``422`` problems."""
        mine = {"state": "pending", "fp": self.fingerprint, "claim": self.nonce}
        try:
            stored = await self.broker.put_resource_if_absent(self.path, mine, ttl=IDEMPOTENCY_LEASE)
        except BrokerError as exc:
            raise _broker_down() from exc
        if stored.get("claim") == self.nonce:
            return None
        if stored.get("fp") != self.fingerprint:
            raise HTTPProblem(422, "this Idempotency-Key was already used with a different request",
                              kind="idempotency-key-reused")
        events = stored.get("events")
        if stored.get("state") != "done" or not isinstance(events, list):
            raise HTTPProblem(409, "a publish with this Idempotency-Key is still in progress; retry shortly",
                              kind="idempotency-key-in-use", headers={"Retry-After": "1"})
        return events

    async def complete(self, published: list[dict[str, str]], *, ttl: int) -> None:
        """Keep the answer for retries (if the broker is gone now, the lease runs out and a retry publishes again)."""
        try:
            await self.broker.put_resource(self.path, {"state": "done", "fp": self.fingerprint, "events": published},
                                           ttl=ttl)
        except BrokerError:
            pass

    async def release(self) -> None:
        """Let a retry in soon after a failed publish (the shortest TTL a resource can have)."""
        try:
            await self.broker.put_resource(self.path, {"state": "failed", "fp": self.fingerprint}, ttl=1)
        except BrokerError:
            pass


async def _publish(broker: Broker, topic: str, events: list[Event]) -> list[dict[str, str]]:
    try:
        cursors = await broker.publish_many([(topic, event) for event in events])
    except BrokerError as exc:
        raise _broker_down() from exc
    return [{"id": event.id, "cursor": cursor} for event, cursor in zip(events, cursors, strict=True)]


def _answer(published: list[dict[str, str]], *, replayed: bool) -> Response:
    headers = {"Cache-Control": "no-store"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps({"events": published}), media_type="application/json", headers=headers)


def _unauthorized(detail: str, *, invalid: bool) -> HTTPProblem:
    challenge = 'Bearer realm="herald"' + (', error="invalid_token"' if invalid else "")
    return HTTPProblem(401, detail, kind="unauthorized", headers={"WWW-Authenticate": challenge})


def _forbidden(detail: str) -> HTTPProblem:
    return HTTPProblem(403, detail, kind="publish-forbidden",
                       headers={"WWW-Authenticate": 'Bearer realm="herald", error="insufficient_scope"'})


def _invalid(index: int, detail: str) -> HTTPProblem:
    return HTTPProblem(422, f"event {index}: {detail}", kind="invalid-event", index=index)


def _broker_down() -> HTTPProblem:
    return HTTPProblem(503, "the broker is unreachable; publish again later", kind="broker-unavailable",
                       headers={"Retry-After": "2"})
