"""Subscribe tokens: signed with ``HERALD_SECRET``, scoped to topics, expiring.

A browser's ``EventSource`` cannot set headers, so the URLs Herald hands out carry a
token in ``?token=``. The token is a compact HS256 JWT whose ``topics`` claim lists
exactly the topics it opens; ``exp`` bounds its life. Verification is offline: any
gateway process holding the same secret accepts it.

Callback tokens, signed with the same secret, are what the command proxy's upstreams use to
report on one operation (:mod:`herald.http.callback`): audience ``herald:callback``, a
``herald.callback`` claim naming the operation, and the ``topics`` besides the operation's own
that its events may go to. Neither kind of token passes for the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

_ALGORITHM = "HS256"
_AUDIENCE = "herald:subscribe"
_CALLBACK_AUDIENCE = "herald:callback"
CALLBACK_CLAIM = "herald.callback"
"""The claim of a callback token that names the one operation it reports on."""


def _b64(raw: bytes) -> bytes:
    """base64url without padding (RFC 7515)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


_HEADER = _b64(b'{"alg":"HS256","typ":"JWT"}')
_OWN_CLAIMS = frozenset({"aud", "topics", "iat", "exp", "sub"})
"""The claims :meth:`TokenSigner.issue` writes: a token with any other is verified by PyJWT."""


class TokenError(Exception):
    """A subscribe token is missing, forged, expired, or does not open the topic.

    ``status`` is the HTTP status to answer with: 401 (no valid token) or 403 (valid,
    but not for this topic).
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CallbackGrant:
    """What a verified callback token allows: reporting on one operation, and publishing to ``topics``."""

    operation_id: str
    topics: frozenset[str]
    expires_at: int


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    topics: frozenset[str]
    subject: str | None
    expires_at: int


class TokenSigner:
    """Issues and verifies subscribe tokens with one secret."""

    def __init__(self, secret: str, *, ttl: int = 3600) -> None:
        if len(secret) < 16:
            raise ValueError("HERALD_SECRET must be at least 16 characters")
        self._secret = secret
        self._key = secret.encode()
        self.ttl = ttl

    def issue(self, topics: Iterable[str], *, subject: str | None = None, ttl: int | None = None) -> str:
        """A token that opens ``topics`` for ``ttl`` seconds (default: the signer's)."""
        now = int(time.time())
        claims: dict[str, object] = {
            "aud": _AUDIENCE,
            "topics": sorted(set(topics)),
            "iat": now,
            "exp": now + (self.ttl if ttl is None else ttl),
        }
        if subject is not None:
            claims["sub"] = subject
        return self._sign(claims)

    def _sign(self, claims: dict[str, object]) -> str:
        # Signed here rather than by jwt.encode: every 202 carries a token, and PyJWT's generic path
        # (key checks, json with sorted separators) cost 60 µs a token against 5 µs for these lines.
        # Verification of anything but these exact tokens stays with PyJWT (TokenSigner._own_claims).
        signing_input = _HEADER + b"." + _b64(orjson.dumps(claims))
        signature = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        return (signing_input + b"." + _b64(signature)).decode()

    def issue_callback(self, operation_id: str, *, topics: Iterable[str] = (), ttl: int) -> str:
        """A callback token: reporting on ``operation_id`` (and publishing to ``topics``) for ``ttl`` seconds."""
        now = int(time.time())
        return self._sign({"aud": _CALLBACK_AUDIENCE, CALLBACK_CLAIM: operation_id, "topics": sorted(set(topics)),
                           "iat": now, "exp": now + ttl})

    def verify_callback(self, token: str | None, operation_id: str) -> CallbackGrant:
        """The grant of a valid callback token for ``operation_id``: :class:`TokenError` 401 if it is not valid,
        403 if it is another operation's."""
        if not token:
            raise TokenError(401, "the callback API needs Authorization: Bearer <Herald-Callback-Token>")
        if len(token) > 8192:
            raise TokenError(401, "the callback token is too long")
        try:
            claims = jwt.decode(token, self._secret, algorithms=[_ALGORITHM], audience=_CALLBACK_AUDIENCE,
                                options={"require": ["exp", CALLBACK_CLAIM]})
        except jwt.ExpiredSignatureError as exc:
            raise TokenError(401, "the callback token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError(401, "the callback token is not valid") from exc
        topics = claims.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise TokenError(401, "the callback token has no valid topics claim")
        if claims[CALLBACK_CLAIM] != operation_id:
            raise TokenError(403, "this callback token is for another operation")
        return CallbackGrant(operation_id, frozenset(topics), int(claims["exp"]))

    def verify(self, token: str | None) -> Grant:
        """The grant of a valid token; :class:`TokenError` (401) otherwise."""
        if not token:
            raise TokenError(401, "a subscribe token is required (?token= or the herald_token cookie)")
        if len(token) > 8192:
            raise TokenError(401, "subscribe token is too long")
        claims = self._own_claims(token)
        if claims is not None:
            return Grant(frozenset(claims["topics"]), claims.get("sub"), claims["exp"])
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "topics"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenError(401, "subscribe token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError(401, "subscribe token is not valid") from exc
        topics = claims.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise TokenError(401, "subscribe token has no valid topics claim")
        subject = claims.get("sub")
        return Grant(frozenset(topics), subject if isinstance(subject, str) else None, int(claims["exp"]))

    def _own_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a token exactly as :meth:`issue` makes them, valid now; ``None`` for anything else.

        Every stream a client opens verifies its token, and PyJWT's generic path was a seventh of the
        gateway's CPU per SSE connect (bench scenario A). This accepts only what PyJWT would accept
        too, and only in the one shape this signer writes: its header byte for byte, its signature
        (compared in constant time), ``aud`` this audience, integer ``exp`` in the future and ``iat``
        not in it, a ``topics`` list of strings, a string ``sub`` if any, and no other registered
        claim. Any other token, valid or not, is left to PyJWT, which decides and says why.
        """
        signing_input, dot, signature = token.encode().rpartition(b".")
        header, _, payload = signing_input.partition(b".")
        if not dot or header != _HEADER:
            return None
        expected = _b64(hmac.new(self._key, signing_input, hashlib.sha256).digest())
        if not hmac.compare_digest(expected, signature):
            return None
        try:
            claims = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(claims, dict) or claims.keys() - _OWN_CLAIMS or claims.get("aud") != _AUDIENCE:
            return None
        exp, iat, topics, sub = claims.get("exp"), claims.get("iat"), claims.get("topics"), claims.get("sub", "")
        now = time.time()
        if type(exp) is not int or exp <= now or (iat is not None and (type(iat) is not int or iat > now)):
            return None
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics) or not isinstance(sub, str):
            return None
        return claims

    def check(self, token: str | None, topics: Iterable[str]) -> Grant:
        """Verify ``token`` and that it opens every one of ``topics`` (403 if not)."""
        grant = self.verify(token)
        missing = [t for t in topics if t not in grant.topics]
        if missing:
            raise TokenError(403, f"subscribe token does not open topic {missing[0]!r}")
        return grant
