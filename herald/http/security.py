"""Who is calling: bearer JWTs on commands and reads, and the subscribe-token cookie for ``EventSource``.

Authentication is off until ``HERALD_JWT_SECRET`` (HS256) or ``HERALD_JWT_PUBLIC_KEY``
(RS256/ES256) is set: then :class:`BearerAuthMiddleware` verifies ``Authorization: Bearer``
on every HTTP request and WebSocket handshake that carries one, puts its ``sub`` claim in
``scope["herald.subject"]`` (the owner of the operations that caller creates), and refuses
with ``401`` the requests that must be authenticated (:class:`BearerRules`): every command
(``POST``, ``PUT``, ``PATCH``, ``DELETE``), ``GET /operations/{id}``, and every domain read route
not declared ``public`` — but not the push routes (the SSE streams and ``/ws``, matched as
routes, not by a suffix), which are opened by subscribe tokens (:mod:`herald.auth`) because a
browser's ``EventSource`` cannot send headers. ``POST /topics/{topic}/events`` is left alone
altogether: it verifies a publisher token itself (:mod:`herald.http.publish`).

The cookie: ``POST /session/cookie`` with ``{"token": "<subscribe token>"}`` sets it as the
``HttpOnly`` cookie ``herald_token``, so an ``EventSource`` (same site, or
``withCredentials`` with CORS) opens streams without a token in its URL;
``DELETE /session/cookie`` clears it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from herald.auth import TokenError
from herald.http.commands import read_json_body
from herald.http.gateway import Gateway
from herald.http.limits import check_json_shape
from herald.http.problems import HTTPProblem, problem_response
from herald.protocol import WS_CLOSE_UNAUTHORIZED
from herald.settings import Settings, SettingsError

COOKIE = "herald_token"
SESSION_COOKIE_PATH = "/session/cookie"
_HMAC_ALGORITHMS = ("HS256",)
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_MAX_TOKEN = 8192
_MAX_SUBJECT = 256
_LEEWAY = 30  # seconds of clock skew tolerated between the token issuer and this gateway
_WRITES = frozenset({"POST", "DELETE", "PUT", "PATCH"})
_READS = frozenset({"GET", "HEAD"})


class BearerError(Exception):
    """A bearer token that cannot be used; ``detail`` says why (never the token itself)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BearerVerifier:
    """Verifies bearer JWTs with the configured keys; returns their subject (or all their claims).

    ``key_setting`` names the public key's setting in startup errors (the publish API has keys of its own).
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        key_setting: str = "HERALD_JWT_PUBLIC_KEY",
    ) -> None:
        if not (secret or public_key):
            raise ValueError("a bearer verifier needs HERALD_JWT_SECRET or HERALD_JWT_PUBLIC_KEY")
        self._keys: dict[str, Any] = {}
        if secret:
            self._keys.update(dict.fromkeys(_HMAC_ALGORITHMS, secret))
        if public_key:
            # Loaded once, here: only its family's algorithms are registered, so a token signed with
            # another family (ES256 against an RSA key) is a 401, not an error inside PyJWT.
            key = _load_public_key(public_key, key_setting)
            self._keys.update(dict.fromkeys(_algorithms_for(key, key_setting), key))
        self.audience = audience
        self.issuer = issuer

    @classmethod
    def from_settings(cls, settings: Settings) -> BearerVerifier | None:
        """The verifier the settings ask for, or ``None`` in anonymous mode."""
        if not settings.auth_enabled:
            return None
        return cls(secret=settings.jwt_secret, public_key=settings.jwt_public_key,
                   audience=settings.jwt_audience, issuer=settings.jwt_issuer)

    def subject(self, token: str) -> str:
        """The ``sub`` of a valid token; :class:`BearerError` otherwise."""
        subject: str = self.claims(token)["sub"]
        return subject

    def claims(self, token: str) -> dict[str, Any]:
        """Every claim of a valid token (``sub`` checked as :meth:`subject` does); :class:`BearerError` otherwise."""
        if len(token) > _MAX_TOKEN:
            raise BearerError("the bearer token is too long")
        try:
            # the algorithm picks the key; an algorithm with no configured key (or "none") is refused
            algorithm = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
            if key is None or not isinstance(algorithm, str):
                raise BearerError(f"bearer tokens must be signed with one of {sorted(self._keys)}")
            claims = jwt.decode(
                token, key, algorithms=[algorithm], audience=self.audience, issuer=self.issuer, leeway=_LEEWAY,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise BearerError("the bearer token has expired") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:  # PyJWT's errors, and what its key code raises
            raise BearerError("the bearer token is not valid") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > _MAX_SUBJECT or not subject.isprintable():
            raise BearerError("the bearer token's subject must be a printable string of 1-256 characters")
        return claims


class BearerRules:
    """Which requests need a bearer token when authentication is on, decided by route, not by path shape.

    ``open_routes``: the routes a subscribe token or nothing opens (the push routes, the cookie);
    ``protected_reads``: the ``GET`` routes that need a bearer (operations, domain reads);
    ``own_auth``: the routes that check a token of their own (``POST /topics/{topic}/events`` verifies a
    publisher token): for their methods the middleware neither asks for nor verifies ``Authorization``.
    Every write needs one, except on an open route.
    """

    def __init__(self, *, open_routes: Iterable[BaseRoute], protected_reads: Iterable[BaseRoute],
                 own_auth: Iterable[Route] = ()) -> None:
        self._open = [_regex(r) for r in open_routes]
        self._reads = [_regex(r) for r in protected_reads]
        self._own = [(_regex(r), frozenset(r.methods or ())) for r in own_auth]

    def authorises_itself(self, method: str, path: str) -> bool:
        """Whether ``method path`` is a route that checks its own token (left alone by the middleware)."""
        return any(method in methods and regex.fullmatch(path) for regex, methods in self._own)

    def needs_bearer(self, method: str, path: str) -> bool:
        """Whether ``method path`` must carry a valid bearer token."""
        if method in _WRITES:
            return not any(regex.fullmatch(path) for regex in self._open)
        if method in _READS:
            return any(regex.fullmatch(path) for regex in self._reads) and not any(
                regex.fullmatch(path) for regex in self._open)
        return False


def _regex(route: BaseRoute) -> re.Pattern[str]:
    regex: re.Pattern[str] = route.path_regex  # type: ignore[attr-defined]  # Route and WebSocketRoute have it
    return regex


class BearerAuthMiddleware:
    """ASGI middleware: ``Authorization: Bearer <JWT>`` → ``scope["herald.subject"]``, or ``401``."""

    def __init__(self, app: ASGIApp, verifier: BearerVerifier, rules: BearerRules) -> None:
        self.app = app
        self.verifier = verifier
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, then hand over to the app."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and self.rules.authorises_itself(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        header = _authorization(scope)
        try:
            if header is not None:
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise BearerError("use Authorization: Bearer <token>")
                scope["herald.subject"] = self.verifier.subject(token.strip())
            elif scope["type"] == "http" and self.rules.needs_bearer(scope["method"], scope["path"]):
                raise BearerError("this request needs Authorization: Bearer <token>")
        except BearerError as exc:
            challenge = 'Bearer realm="herald"' + (', error="invalid_token"' if header is not None else "")
            response = problem_response(HTTPProblem(401, exc.detail, kind="unauthorized",
                                                    headers={"WWW-Authenticate": challenge}))
            if scope["type"] == "http":
                await response(scope, receive, send)
            elif "websocket.http.response" in scope.get("extensions", {}):  # the handshake answered with the 401
                await WebSocket(scope, receive, send).send_denial_response(response)
            else:
                await send({"type": "websocket.close", "code": WS_CLOSE_UNAUTHORIZED, "reason": exc.detail})
            return
        await self.app(scope, receive, send)


def _load_public_key(pem: str, setting: str) -> Any:
    """The PEM public key, or :class:`ValueError` saying what is wrong with ``setting`` (raised at startup)."""
    try:
        return serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SettingsError(f"{setting} is not a PEM public key: {exc}") from exc


def _algorithms_for(key: Any, setting: str) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return (_EC_ALGORITHMS[key.curve.name],)
    raise SettingsError(f"{setting} must be an RSA key or an EC key on P-256, P-384 or P-521")


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


# The cookie ------------------------------------------------------------------------------------

async def set_cookie(request: Request) -> Response:
    """``POST /session/cookie`` ``{"token": …}``: keep a subscribe token as the ``HttpOnly`` cookie."""
    gateway = Gateway.of(request)
    body = await read_json_body(request, gateway.settings.max_body)
    check_json_shape(body, gateway.settings)
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or set(body) != {"token"}:
        raise HTTPProblem(422, 'the body must be {"token": "<subscribe token>"}', kind="invalid-body")
    try:
        grant = gateway.signer.verify(token)
    except TokenError as exc:
        raise HTTPProblem(exc.status, exc.detail, kind="invalid-token") from exc
    subject = request.scope.get("herald.subject")
    if grant.subject is not None and subject is not None and grant.subject != subject:
        raise HTTPProblem(403, "this subscribe token was issued to someone else", kind="forbidden-token")
    response = Response(orjson.dumps({"topics": sorted(grant.topics), "expires_at": grant.expires_at}),
                        media_type="application/json", headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE, token, max_age=max(0, grant.expires_at - int(time.time())), path="/",
                        httponly=True, samesite="lax", secure=_secure(request, gateway))
    return response


async def clear_cookie(request: Request) -> Response:
    """``DELETE /session/cookie``: forget the cookie."""
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax",
                           secure=_secure(request, Gateway.of(request)))
    return response


def _secure(request: Request, gateway: Gateway) -> bool:
    return request.url.scheme == "https" or gateway.settings.public_url.startswith("https://")


routes = [
    Route(SESSION_COOKIE_PATH, set_cookie, methods=["POST"]),
    Route(SESSION_COOKIE_PATH, clear_cookie, methods=["DELETE"]),
]
