"""The Mercure hub at ``/.well-known/mercure``: existing Mercure publishers and subscribers, unchanged.

``POST`` publishes an update (a form, :func:`herald.mercure.parse_publish_form`) and answers
``200 text/plain`` with its id; ``GET ?topic=…`` subscribes, as a Server-Sent Events stream. The
protocol itself (selectors, claims, rendering) is :mod:`herald.mercure`; this module moves it over
HTTP and onto Herald's one core:

* **Storage.** Every update is one event on the internal topic :data:`~herald.mercure.FIREHOSE`, so
  it shares the broker's history, TTL and cross-process fan-out (Redis) with Herald's own topics.
  One stream for the whole hub, as the reference hub keeps one history: a ``Last-Event-ID`` names a
  point in the hub's history, not in one topic's, and a subscriber to many selectors resumes in
  publish order, without repeats.
* **Fan-out.** This process follows the firehose once (:class:`MercureRouter`, the hub's only
  follower of it) and hands each update to the subscribers it concerns, found by their selectors:
  exact topics by dictionary, ``*`` as a set, and each distinct URI Template matched once per update
  (many subscribers share one). A private update reaches only subscribers whose ``mercure.subscribe``
  claim matches one of its topics. Each subscriber is a :class:`~herald.hub.Subscriber` of the
  process's hub: bounded queue, slow-consumer cut-off, heartbeats, shutdown and the token's ``exp``.
* **Resume.** ``Last-Event-ID`` (header) or ``lastEventID`` (query) is an update's id. Its cursor in
  the firehose is looked up in the router's index of the ids it saw go by (``HERALD_HISTORY_SIZE``
  of them), else by reading the history kept. Known: the updates after it are replayed, and the
  response's ``Last-Event-ID`` names it. ``earliest``: the whole history kept. Unknown or expired:
  nothing is replayed, the stream starts live, and the response's ``Last-Event-ID`` names the newest
  update (``earliest`` when there is none): as the reference hub does, and how a client learns that
  it missed updates (the header differs from the id it sent). Without either, the stream starts
  live and the header names the newest update all the same.
* **Keys.** ``HERALD_MERCURE_PUBLISHER_JWT_KEY`` and ``HERALD_MERCURE_SUBSCRIBER_JWT_KEY`` (this one
  defaults to the publisher's): an HMAC secret of 32 bytes or more, or a PEM public key (RSA or EC),
  told apart by the PEM header; ``HERALD_MERCURE_JWT_ALGORITHMS`` narrows the algorithms. A publisher
  presents its JWT as ``Authorization: Bearer`` or ``?authorization=``; a subscriber also in the
  ``mercureAuthorization`` cookie. Herald's own bearer middleware never sees this path.

Served by :class:`MercureMiddleware`, outermost, which also answers CORS for the hub's own origins
(``HERALD_MERCURE_CORS_ORIGINS``, with credentials, so a cross-origin ``EventSource`` can send the cookie).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, cast

import jwt
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from herald.broker.base import BrokerError, StoredEvent
from herald.http.fastwrite import ChunkWriter, take_chunk_writer
from herald.http.gateway import Gateway
from herald.http.problems import HTTPProblem, problem_response
from herald.http.push import DisconnectWatch, _watch_task, admit
from herald.http.security import _algorithms_for, _load_public_key
from herald.hub import HEARTBEAT, Subscriber
from herald.mercure import (
    ANONYMOUS,
    COOKIE,
    EARLIEST,
    FIREHOSE,
    FORM_TYPE,
    HUB_PATH,
    PREAMBLE,
    SUBSCRIBE_HEADERS,
    Claims,
    MercureError,
    MercureFrame,
    Selector,
    any_matches,
    parse_publish_form,
    selectors,
)
from herald.mercure import HEARTBEAT as SSE_HEARTBEAT
from herald.protocol import Frame, parse_cursor
from herald.settings import MIN_SECRET, Settings, SettingsError

log = logging.getLogger("herald.mercure")

_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_MAX_TOKEN = 8192
_VERIFIED = 1024  # tokens whose signature was checked, kept per key (a publisher reuses its token)
_PAGE = 1000  # history events read per round trip while resuming
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mercure"'}


class MercureKey:
    """Verifies Mercure JWTs with one configured key: an HMAC secret, or a PEM public key (RSA or EC)."""

    def __init__(self, key: str, *, setting: str, algorithms: tuple[str, ...] = ()) -> None:
        """Load ``key`` (from the variable ``setting``); :class:`SettingsError` when it cannot verify anything.

        ``algorithms``: ``HERALD_MERCURE_JWT_ALGORITHMS``, the allowed ones (empty: HS256 for a secret,
        the key's family for a public key: RS256/384/512, or the ES one of its curve).
        """
        self._key: Any
        if key.lstrip().startswith("-----BEGIN"):
            self._key = _load_public_key(key, setting)
            family = _algorithms_for(self._key, setting)
            default = family
        else:
            if len(key.encode()) < MIN_SECRET:
                raise SettingsError(f"{setting} must be at least {MIN_SECRET} bytes (e.g. `openssl rand -hex 32`) "
                                    "or a PEM public key")
            self._key = key
            family, default = _HMAC_ALGORITHMS, ("HS256",)
        self.algorithms = tuple(a for a in family if a in algorithms) if algorithms else default
        if not self.algorithms:
            raise SettingsError(f"HERALD_MERCURE_JWT_ALGORITHMS ({', '.join(algorithms)}) allows none of the "
                                f"algorithms of {setting}'s key ({', '.join(family)})")
        # A publisher sends the same token with every update: verifying its signature once is enough
        # (what a valid token allows never changes, and its exp is checked again on every use).
        self._verified: OrderedDict[str, Claims] = OrderedDict()

    def claims(self, token: str) -> Claims:
        """The Mercure claims of a valid token; :class:`MercureError` (401) otherwise.

        ``exp`` is checked when present, without leeway, as the reference hub does (a subscription
        ends at its token's ``exp``: one accepted past it would end at once); no claim is required (a
        publisher's token often has no ``exp``) and ``aud`` is not checked.
        """
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at and time.time() >= known.expires_at:
                del self._verified[token]
                raise MercureError(401, "the token has expired", "invalid-token")
            return known
        if len(token) > _MAX_TOKEN:
            raise MercureError(401, "the token is too long", "invalid-token")
        try:
            payload = jwt.decode(token, self._key, algorithms=list(self.algorithms), options={"verify_aud": False})
        except jwt.ExpiredSignatureError as exc:
            raise MercureError(401, "the token has expired", "invalid-token") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise MercureError(401, f"the token is not valid (signed with one of {', '.join(self.algorithms)} and "
                               "this hub's key?)", "invalid-token") from exc
        claims = Claims.of(payload)
        self._verified[token] = claims
        if len(self._verified) > _VERIFIED:
            self._verified.popitem(last=False)
        return claims


class MercureSubscriber(Subscriber):
    """One subscription: a hub subscriber with its topic selectors and its token's claims."""

    __slots__ = ("claims", "selectors")

    def __init__(self, max_queue: int, chosen: tuple[Selector, ...], claims: Claims) -> None:
        super().__init__(max_queue, "sse")
        self.selectors = chosen
        self.claims = claims

    def wants(self, frame: MercureFrame) -> bool:
        """Whether this subscription receives the update (selected, and private only when its claims allow)."""
        update = frame.update
        return any_matches(self.selectors, update.topics) and self.claims.may_receive(update)


class MercureRouter(Subscriber):
    """The firehose's one follower in this process: hands each update to the subscriptions it concerns.

    It is a :class:`~herald.hub.Subscriber` of the hub's firehose topic only to be dispatched to; it
    queues nothing, and stays for the life of the process once the first subscription opened. It
    also remembers the cursor of the last ``HERALD_HISTORY_SIZE`` update ids it saw, for resumes.
    """

    __slots__ = ("_everything", "_exact", "_id_limit", "_templates", "cursors")

    def __init__(self, id_limit: int) -> None:
        super().__init__(1, "mercure-router")
        self._exact: dict[str, set[MercureSubscriber]] = {}
        self._templates: dict[Selector, set[MercureSubscriber]] = {}
        self._everything: set[MercureSubscriber] = set()
        self._id_limit = id_limit
        self.cursors: OrderedDict[str, str] = OrderedDict()
        """Update id → its cursor in the firehose, for the newest ids seen live."""

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are indexed (a subscription with several selectors counts once per selector)."""
        return (len(self._everything) + sum(map(len, self._exact.values()))
                + sum(map(len, self._templates.values())))

    def add(self, sub: MercureSubscriber) -> None:
        """Index ``sub`` under each of its selectors."""
        for chosen in sub.selectors:
            self._group(chosen).add(sub)

    def remove(self, sub: MercureSubscriber) -> None:
        """Forget ``sub``."""
        for chosen in sub.selectors:
            group = self._group(chosen)
            group.discard(sub)
            if not group and not chosen.everything:
                if chosen.template is None:
                    del self._exact[chosen.source]
                else:
                    del self._templates[chosen]

    def _group(self, chosen: Selector) -> set[MercureSubscriber]:
        if chosen.everything:
            return self._everything
        if chosen.template is None:
            return self._exact.setdefault(chosen.source, set())
        return self._templates.setdefault(chosen, set())

    # Called by the hub ---------------------------------------------------------------------
    def push(self, frame: Frame) -> None:
        """Route one live frame of the firehose."""
        try:
            mercure = MercureFrame.of(frame)
        except ValueError:
            log.warning("an event on %s is no Mercure update; skipped", FIREHOSE, extra={"event": "mercure.skipped"})
            return
        cursors = self.cursors
        cursors[mercure.update.id] = frame.cursor
        if len(cursors) > self._id_limit:
            cursors.popitem(last=False)
        update = mercure.update
        targets = set(self._everything)
        for topic in update.topics:
            exact = self._exact.get(topic)
            if exact:
                targets |= exact
        for chosen, subs in self._templates.items():
            if chosen.matches_any(update.topics):
                targets |= subs
        for sub in targets:
            if update.private and not sub.claims.may_receive(update):
                continue
            try:  # one subscription's failure must not cost the others the update
                sub.push(mercure)
            except Exception:
                log.exception("handing an update to a Mercure subscription failed; closing it",
                              extra={"event": "mercure.push_failed"})
                sub.close("error")

    def gap(self, topic: str, oldest: str | None, **_: Any) -> None:
        """Updates were lost beyond the history: end every subscription, each resumes from its last id."""
        for sub in {*self._everything, *(s for g in self._exact.values() for s in g),
                    *(s for g in self._templates.values() for s in g)}:
            sub.close("gap")

    def close(self, reason: str) -> None:
        """Stays: the hub closes each subscription itself (they are its subscribers too)."""

    def beat(self) -> None:
        """Nothing to write: each subscription gets its own heartbeats."""


class MercureHub:
    """The hub of one gateway process: its keys, its router, and the two endpoints."""

    def __init__(self, gateway: Gateway, *, publisher: MercureKey | None, subscriber: MercureKey | None) -> None:
        self.gateway = gateway
        self.settings: Settings = gateway.settings
        self.publisher = publisher
        self.subscriber = subscriber
        self.router = MercureRouter(gateway.settings.history_size)

    @classmethod
    def from_settings(cls, gateway: Gateway) -> MercureHub:
        """The hub the settings describe; :class:`SettingsError` for a key it cannot use."""
        settings = gateway.settings
        if "*" in settings.mercure_cors_origins:
            raise SettingsError("HERALD_MERCURE_CORS_ORIGINS=* is refused: the hub allows credentials (the "
                                "mercureAuthorization cookie), so list the origins of your subscribers")
        algorithms = tuple(a.upper() for a in settings.mercure_jwt_algorithms)
        publisher = subscriber = None
        if settings.mercure_publisher_jwt_key:
            publisher = MercureKey(settings.mercure_publisher_jwt_key, setting="HERALD_MERCURE_PUBLISHER_JWT_KEY",
                                   algorithms=algorithms)
        if settings.mercure_subscriber_jwt_key:
            subscriber = MercureKey(settings.mercure_subscriber_jwt_key,
                                    setting="HERALD_MERCURE_SUBSCRIBER_JWT_KEY", algorithms=algorithms)
        return cls(gateway, publisher=publisher, subscriber=subscriber or publisher)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``/.well-known/mercure``: ``POST`` publishes, ``GET`` subscribes."""
        method = scope["method"]
        if method == "GET":
            await self.subscribe(scope, receive, send)
            return
        try:
            if method == "POST":
                response = await self.publish(Request(scope, receive))
            elif method == "OPTIONS":
                response = Response(status_code=204, headers={"Allow": "GET, POST, OPTIONS"})
            else:
                raise HTTPProblem(405, "the hub takes GET (subscribe) and POST (publish)", kind="method-not-allowed",
                                  headers={"Allow": "GET, POST, OPTIONS"})
        except MercureError as exc:
            response = problem_response(_problem(exc))
        except HTTPProblem as exc:
            response = problem_response(exc)
        await response(scope, receive, send)

    # Publish ---------------------------------------------------------------------------------
    async def publish(self, request: Request) -> Response:
        """``POST``: store and fan out one update; ``200 text/plain`` with its id."""
        if self.publisher is None:
            raise HTTPProblem(401, "publishing is off on this hub: set HERALD_MERCURE_PUBLISHER_JWT_KEY",
                              kind="unauthorized", headers=_CHALLENGE)
        token = _bearer(request) or request.query_params.get("authorization")
        if not token:
            raise MercureError(401, "publish with a JWT: Authorization: Bearer <token>", "unauthorized")
        claims = self.publisher.claims(token)
        if claims.publish is None:
            raise MercureError(401, 'the token has no "mercure.publish" claim', "unauthorized")
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != FORM_TYPE:
            raise HTTPProblem(415, f"publish a form: Content-Type: {FORM_TYPE}", kind="unsupported-media-type",
                              headers={"Accept-Post": FORM_TYPE})
        body = await _read_body(request, self.settings.publish_max_body)
        update = parse_publish_form(body, max_topics=self.settings.max_topics_per_connection)
        if not claims.may_publish(update.topics):
            raise MercureError(403, 'a topic of this update matches none of the token\'s "mercure.publish" selectors',
                               "forbidden-topic")
        try:
            await self.gateway.broker.publish(FIREHOSE, update.to_event())
        except BrokerError as exc:
            raise HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                              headers={"Retry-After": "2"}) from exc
        return Response(update.id, media_type="text/plain")

    # Subscribe -------------------------------------------------------------------------------
    def _claims(self, request: Request) -> tuple[str | None, Claims]:
        """The subscriber's JWT (header, then query, then cookie) and its claims; none and anonymous if allowed."""
        token = _bearer(request) or request.query_params.get("authorization") or request.cookies.get(COOKIE)
        if not token:
            if self.settings.mercure_anonymous:
                return None, ANONYMOUS
            raise MercureError(401, "subscribe with a JWT (the mercureAuthorization cookie, Authorization: Bearer "
                               "or ?authorization=); this hub takes no anonymous subscribers", "unauthorized")
        if self.subscriber is None:
            raise MercureError(401, "this hub verifies no subscriber tokens: set HERALD_MERCURE_SUBSCRIBER_JWT_KEY",
                               "unauthorized")
        return token, self.subscriber.claims(token)

    async def subscribe(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET``: a Server-Sent Events stream of the updates the selectors choose, until the client leaves."""
        gateway = self.gateway
        hub = gateway.hub
        request = Request(scope, receive)
        try:
            raw = request.query_params.getlist("topic")
            if not raw:
                raise MercureError(400, 'missing "topic": name at least one topic selector', "missing-topic")
            if len(raw) > self.settings.max_topics_per_connection:
                raise MercureError(400, f"at most {self.settings.max_topics_per_connection} topic selectors",
                                   "too-many-topics")
            chosen = selectors(raw)
            token, claims = self._claims(request)
            # counted as Herald's own streams are: in all, per client and per token (herald.http.admission)
            seat = admit(gateway, request, token)
        except MercureError as exc:
            await problem_response(_problem(exc))(scope, receive, send)
            return
        except HTTPProblem as exc:
            await problem_response(exc)(scope, receive, send)
            return
        requested = request.headers.get("last-event-id") or request.query_params.get("lastEventID") or None
        del request
        sub = MercureSubscriber(self.settings.queue_size, chosen, claims)
        try:
            await hub.attach(self.router, FIREHOSE)  # once per process; later calls return at once
            hub.join(sub)
            sub.hold(FIREHOSE, None)  # live updates wait while the history is read
            self.router.add(sub)
            last_id, missed = await self._resume(sub, requested)
        except BaseException as exc:
            self.router.remove(sub)
            await hub.leave(sub)
            gateway.admission.release(seat)
            if not isinstance(exc, BrokerError):
                raise
            await problem_response(HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable",
                                               headers={"Retry-After": "2"}))(scope, receive, send)
            return
        sub.replay(FIREHOSE, missed)
        hub.expire_at(sub, claims.expires_at)
        sub.task = asyncio.current_task()
        try:
            await self._stream(sub, last_id, scope, receive, send)
        finally:
            gateway.admission.release(seat)

    async def _resume(self, sub: MercureSubscriber, requested: str | None) -> tuple[str, list[MercureFrame]]:
        """The response's ``Last-Event-ID`` and the updates to replay; sets where live updates start."""
        if requested == EARLIEST:
            return EARLIEST, [f for f in await self._read(None) or () if sub.wants(f)]
        if requested is None:
            newest = [f for f in map(_frame, await self.gateway.broker.tail(FIREHOSE, 1)) if f is not None]
        else:
            history: list[MercureFrame] | None = None
            cursor = self.router.cursors.get(requested)
            if cursor is not None:
                history = await self._read(cursor)
                if history is not None:  # the update is still kept: what follows it
                    sub.positions[FIREHOSE] = parse_cursor(cursor)
                    return requested, [f for f in history if sub.wants(f)]
            history = await self._read(None) or []
            for i, frame in enumerate(history):
                if frame.update.id == requested:
                    sub.positions[FIREHOSE] = frame.key
                    return requested, [f for f in history[i + 1:] if sub.wants(f)]
            newest = history[-1:]  # unknown or expired: live from now, as the reference hub does
        if not newest:
            return EARLIEST, []
        sub.positions[FIREHOSE] = newest[0].key
        return newest[0].update.id, []

    async def _read(self, after: str | None) -> list[MercureFrame] | None:
        """Every update kept after ``after`` (``None``: all of them); ``None`` when ``after`` is no longer kept."""
        out: list[MercureFrame] = []
        for _ in range(self.settings.history_size // _PAGE + 2):  # bounded: the history is, plus a page or two
            page = await self.gateway.broker.read(FIREHOSE, after, limit=_PAGE)
            if after is not None and not out and page.truncated:  # also when it is of another epoch (reset)
                return None
            out.extend(f for f in map(_frame, page.events) if f is not None)
            if len(page.events) < _PAGE:
                break
            after = page.events[-1].cursor
        return out

    async def _stream(self, sub: MercureSubscriber, last_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.gateway.hub
        # Herald's uvicorn protocol (herald/http/fastwrite.py) when nothing stands in for the connection:
        # frames written straight to the socket and a watch without a task; plain ASGI otherwise
        write = take_chunk_writer(scope)
        if write is not None and not write.serves(receive):
            write = None
        watcher = DisconnectWatch(receive, sub) if write is not None else _watch_task(receive, sub)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*SUBSCRIBE_HEADERS, (b"last-event-id", last_id.encode())]})
            await send({"type": "http.response.body", "body": PREAMBLE, "more_body": True})
            if write is not None:
                sub.direct = _DirectWrite(write)
            while True:
                batch = await sub.next_batch()
                if not batch:
                    break  # the client left, or the hub ended the stream: an EventSource comes back with its id
                body = b"".join(cast(MercureFrame, item).message if item is not HEARTBEAT else SSE_HEARTBEAT
                                for item in batch if item is HEARTBEAT or isinstance(item, MercureFrame))
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except asyncio.CancelledError:
            if sub.reason != "slow-consumer":
                raise
            log.info("cut off a slow Mercure subscriber", extra={"event": "mercure.slow_consumer"})
            return
        finally:
            sub.direct = None
            watcher.cancel()
            self.router.remove(sub)
            await hub.leave(sub)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _DirectWrite:
    """The hub's direct write for a subscription: an update's message as one chunk."""

    __slots__ = ("write",)

    def __init__(self, write: ChunkWriter) -> None:
        self.write = write

    def __call__(self, frame: Frame) -> bool:
        return self.write(cast(MercureFrame, frame).message)


class MercureMiddleware:
    """Serves ``/.well-known/mercure`` before anything else does; hands every other request on.

    Installed outermost: the hub authorises with its own keys (Herald's bearer middleware never
    sees it) and answers CORS for its own origins, ``HERALD_MERCURE_CORS_ORIGINS`` (Starlette's
    ``CORSMiddleware``, with credentials), whatever ``HERALD_CORS_ORIGINS`` says of the rest.
    """

    def __init__(self, app: ASGIApp, hub: MercureHub) -> None:
        self.app = app
        self.hub = hub
        origins = list(hub.settings.mercure_cors_origins)
        self.serve: Callable[[Scope, Receive, Send], Awaitable[None]] = hub if not origins else CORSMiddleware(
            hub, allow_origins=origins, allow_methods=["GET", "POST"], allow_credentials=True,
            allow_headers=["Authorization", "Last-Event-ID", "Cache-Control", "Content-Type"],
            expose_headers=["Last-Event-ID"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the hub's path, or hand the request on."""
        if scope["type"] == "http" and scope["path"] == HUB_PATH:
            await self.serve(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _frame(stored: StoredEvent) -> MercureFrame | None:
    try:
        return MercureFrame.stored(stored.cursor, stored.event)
    except ValueError:
        return None


def _problem(exc: MercureError) -> HTTPProblem:
    return HTTPProblem(exc.status, exc.detail, kind=exc.kind, headers=_CHALLENGE if exc.status == 401 else None)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MercureError(401, "use Authorization: Bearer <token>", "unauthorized")
    return token.strip()


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise HTTPProblem(413, f"the body is larger than {limit} bytes", kind="body-too-large", max_body=limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"the body is larger than {limit} bytes", kind="body-too-large", max_body=limit)
        chunks.append(chunk)
    return b"".join(chunks)
