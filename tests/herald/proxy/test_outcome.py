"""The outcomes table, pure: what each upstream answer means for the operation."""

from __future__ import annotations

import email.utils

import orjson
import pytest

from herald.proxy.outcome import (
    Accepted,
    Refused,
    Retriable,
    Succeeded,
    classify,
    location_path,
    parse_retry_after,
)

PROBLEM = {"content-type": "application/problem+json"}


@pytest.mark.parametrize("status", [200, 201])
def test_2xx_with_json_succeeds_with_the_body_and_its_location(status: int) -> None:
    outcome = classify(status, {"location": "/thumbnails/7"}, b'{"url": "/t/7.png"}')
    assert outcome == Succeeded({"url": "/t/7.png"}, "/thumbnails/7")


def test_2xx_without_a_body_succeeds_with_no_result() -> None:
    assert classify(204, {}, b"") == Succeeded(None, None)


def test_2xx_with_a_body_that_is_not_json_breaks_the_contract() -> None:
    outcome = classify(200, {}, b"<html>")
    assert isinstance(outcome, Refused)
    assert outcome.problem["type"].endswith("/bad-upstream-answer")


def test_202_hands_off_with_the_cancel_url_it_gives() -> None:
    assert classify(202, {"herald-cancel": "/jobs/9"}, b"") == Accepted("/jobs/9")
    assert classify(202, {}, b"{}") == Accepted(None)


def test_another_4xx_fails_with_the_upstreams_problem_passed_through() -> None:
    doc = {"type": "https://up/problems/size", "title": "Bad size", "status": 400, "detail": "64 or 128",
           "sizes": [64, 128]}
    outcome = classify(422, PROBLEM, orjson.dumps(doc))
    assert outcome == Refused({**doc, "status": 422})  # the status it answered wins over the one it wrote


def test_another_4xx_without_a_problem_is_wrapped_in_one_with_an_excerpt() -> None:
    outcome = classify(404, {"content-type": "text/plain"}, b"no such album " * 100)
    assert isinstance(outcome, Refused)
    problem = outcome.problem
    assert (problem["type"], problem["status"]) == ("https://herald.dev/problems/upstream-refused", 404)
    assert problem["body"].startswith("no such album") and len(problem["body"]) == 300


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_408_429_and_5xx_are_retried(status: int) -> None:
    outcome = classify(status, {"retry-after": "3"}, b"")
    assert outcome == Retriable(f"the upstream answered {status}", 3.0)


def test_a_redirect_is_not_followed_and_fails() -> None:
    outcome = classify(302, {"location": "http://elsewhere/"}, b"")
    assert isinstance(outcome, Refused)


def test_retry_after_is_seconds_or_an_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("given", "kept"),
    [("/thumbnails/7", "/thumbnails/7"), ("http://evil.example/x", None), ("//evil.example/x", None),
     ("thumbnails/7", None), ("/a b", None), (None, None)],
)
def test_only_a_path_of_the_public_api_becomes_the_303_target(given: str | None, kept: str | None) -> None:
    assert location_path(given) == kept
