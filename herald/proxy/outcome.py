"""What an upstream's answer means for the operation: the outcomes table, as pure functions. No I/O.

====================================================  ===========================================
the upstream answers                                  the operation
====================================================  ===========================================
``2xx`` (not 202) with JSON, or no body               ``succeeded``, the body as the result; a
                                                      ``Location`` path is the 303 target
``202``                                               stays ``running``: the upstream reports later
                                                      through the callback API
another ``4xx``                                       ``failed`` with the upstream's problem
                                                      (``application/problem+json`` passed on;
                                                      any other body wrapped in one)
``408``, ``429``, ``5xx``, no answer in time,         retried after a backoff (``Retry-After``
connection refused or reset                           honoured) until the attempts run out
``2xx`` with a body that is not JSON, ``3xx``         ``failed``: the upstream broke the contract
====================================================  ===========================================
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

PROBLEM_BASE = "https://herald.dev/problems/"
RETRIABLE_4XX = frozenset({408, 425, 429})
"""Client errors that say "later", not "never": timeout, too early, too many requests."""
EXCERPT = 300
"""Characters of a non-problem error body kept in the problem that wraps it."""


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The upstream did the work: ``result`` is its JSON body, ``location`` the created resource's path."""

    result: Any
    location: str | None


@dataclass(frozen=True, slots=True)
class Accepted:
    """The upstream took the work and reports later; ``cancel`` is where it takes a ``DELETE``, if it said."""

    cancel: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    """The upstream refused for good: the operation fails with ``problem``."""

    problem: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Retriable:
    """No result this time; worth another attempt after at least ``retry_after`` seconds (if the upstream said)."""

    reason: str
    retry_after: float | None = None


Outcome = Succeeded | Accepted | Refused | Retriable


def classify(status: int, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> Outcome:
    """The outcome of an upstream's answer (``headers`` with lower-case names)."""
    if status == 202:
        return Accepted(headers.get("herald-cancel") or None)
    if 200 <= status < 300:
        if not body.strip():
            return Succeeded(None, location_path(headers.get("location")))
        try:
            result = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Refused(_contract(f"the upstream answered {status} with a body that is not JSON"))
        return Succeeded(result, location_path(headers.get("location")))
    if status in RETRIABLE_4XX or status >= 500:
        return Retriable(f"the upstream answered {status}", parse_retry_after(headers.get("retry-after"), now=now))
    if 400 <= status < 500:
        return Refused(upstream_problem(status, headers.get("content-type", ""), body))
    return Refused(_contract(f"the upstream answered {status}; Herald follows no redirects"))


def location_path(value: str | None) -> str | None:
    """A ``Location`` kept as the operation's 303 target: a path of the public API (``/…``), else nothing.

    It is passed on as given, never resolved against the upstream: the client follows it on the gateway.
    An absolute URL or ``//host`` would send clients elsewhere, so it is dropped.
    """
    if value is None or not value.startswith("/") or value.startswith("//") or len(value) > 2048:
        return None
    if not value.isprintable() or " " in value:
        return None
    return value


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delay-seconds or an HTTP date (RFC 9110); ``None`` if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 86400))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def upstream_problem(status: int, content_type: str, body: bytes) -> dict[str, Any]:
    """The problem a refusal fails the operation with: the upstream's own, or one wrapping its answer."""
    if content_type.split(";")[0].strip().lower() == "application/problem+json":
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            doc.setdefault("type", "about:blank")
            doc.setdefault("title", "The upstream refused the request")
            doc["status"] = status  # what it answered, whatever the document claims
            return doc
    excerpt = body[:EXCERPT * 4].decode("utf-8", errors="replace")[:EXCERPT]
    doc = {"type": PROBLEM_BASE + "upstream-refused", "title": "The upstream refused the request",
           "status": status, "detail": f"the upstream answered {status}"}
    if excerpt.strip():
        doc["body"] = excerpt
    return doc


def _contract(detail: str) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + "bad-upstream-answer", "title": "The upstream's answer broke the proxy contract",
            "status": 502, "detail": detail}
