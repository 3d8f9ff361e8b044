"""Subscribe tokens: what TokenSigner issues is a standard HS256 JWT that PyJWT (and so any JWT library) reads."""

from __future__ import annotations

import base64
import time

import jwt
import orjson
import pytest

from herald.auth import TokenError, TokenSigner

SECRET = "unit-test-secret-0123456789abcdef"


def test_an_issued_token_is_a_jwt_that_pyjwt_verifies_with_the_secret() -> None:
    token = TokenSigner(SECRET, ttl=600).issue(["chats/b", "chats/a", "chats/a"], subject="alice")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="herald:subscribe")
    assert claims["topics"] == ["chats/a", "chats/b"] and claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 600 and abs(claims["iat"] - time.time()) < 60
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-0123456789abcdefgh", algorithms=["HS256"], audience="herald:subscribe")


def test_verify_reads_back_what_issue_wrote_and_a_pyjwt_token_alike() -> None:
    signer = TokenSigner(SECRET)
    grant = signer.verify(signer.issue(["operations/op_1"]))
    assert grant.topics == frozenset({"operations/op_1"}) and grant.subject is None
    foreign = jwt.encode({"aud": "herald:subscribe", "topics": ["chats/x"], "exp": int(time.time()) + 60},
                         SECRET, algorithm="HS256")
    assert signer.verify(foreign).topics == frozenset({"chats/x"})


def test_a_token_whose_claims_were_changed_is_refused() -> None:
    signer = TokenSigner(SECRET)
    head, payload, signature = signer.issue(["chats/mine"]).split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["topics"] = ["chats/theirs"]
    forged = ".".join([head, base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode(), signature])
    with pytest.raises(TokenError) as caught:
        signer.verify(forged)
    assert caught.value.status == 401


def _signed(claims: dict[str, object], *, secret: str = SECRET, header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> str:
    """A token with exactly ``header`` and ``claims``, signed with ``secret`` (whatever they say)."""
    import hashlib
    import hmac

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(header) + b"." + b64(orjson.dumps(claims))
    return (signing_input + b"." + b64(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())).decode()


def test_the_fast_path_accepts_only_tokens_pyjwt_accepts_with_the_same_claims() -> None:
    signer = TokenSigner(SECRET)
    now = int(time.time())
    good = {"aud": "herald:subscribe", "topics": ["chats/a"], "iat": now, "exp": now + 60}
    variants: list[str] = [
        signer.issue(["chats/a", "chats/b"], subject="alice"),
        _signed(good),
        _signed({**good, "exp": now - 1}),  # expired
        _signed({**good, "exp": now}),  # expires this very second: PyJWT says expired too
        _signed({**good, "exp": float(now + 60)}),  # a float exp: PyJWT's to judge
        _signed({**good, "exp": True}),
        _signed({**good, "iat": now + 3600}),  # issued in the future
        _signed({**good, "iat": "yesterday"}),
        _signed({**good, "nbf": now + 3600}),  # not yet valid
        _signed({**good, "aud": "herald:callback"}),
        _signed({**good, "aud": ["herald:subscribe", "other"]}),
        _signed({k: v for k, v in good.items() if k != "aud"}),
        _signed({k: v for k, v in good.items() if k != "exp"}),
        _signed({**good, "topics": "chats/a"}),
        _signed({**good, "topics": [1]}),
        _signed({**good, "sub": 7}),
        _signed({**good, "jti": 7}),
        _signed(good, secret="another-secret-0123456789abcdefgh"),
        _signed(good, header=b'{"alg":"HS256","typ":"JWT","kid":"k1"}'),
        _signed(good, header=b'{"alg":"none","typ":"JWT"}'),
        _signed(good)[:-2] + "AA",  # another signature
        _signed(good) + "=",  # padding on the signature
    ]
    fast_accepted = 0
    for token in variants:
        try:
            expected = jwt.decode(token, SECRET, algorithms=["HS256"], audience="herald:subscribe",
                                  options={"require": ["exp", "topics"]})
        except jwt.InvalidTokenError:
            expected = None
        fast = signer._own_claims(token)
        if fast is not None:
            fast_accepted += 1
            assert fast == expected, token  # nothing accepted here that PyJWT refuses, nor read differently
        topics = expected.get("topics") if expected is not None else None
        valid = isinstance(topics, list) and all(isinstance(t, str) for t in topics)
        try:
            grant = signer.verify(token)
        except TokenError:
            assert not valid, token  # refused by PyJWT, or by Herald's own topics check after it
        else:
            assert valid and grant.topics == frozenset(topics or ()), token
    assert fast_accepted == 2  # Herald's own two good tokens took the fast path; the rest went to PyJWT
