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
