"""Limits on what one client may send: the shape of JSON bodies, and commands per second.

* :func:`check_json_shape` — after a body is parsed: nesting deeper than
  ``HERALD_MAX_JSON_DEPTH`` or a string (value or key) longer than ``HERALD_MAX_JSON_STRING``
  characters is ``422``. One pass over the parsed document, no recursion.
* :func:`enforce_rate_limit` — ``HERALD_RATE_LIMIT`` commands per client per second (unset: 20 in
  anonymous mode, so one client cannot fill the broker by default; unlimited with bearer auth;
  ``0`` turns it off), counted in
  a fixed one-second window by the broker (:meth:`~herald.broker.base.Broker.hit`), so every
  gateway process sharing a Redis counts against the same budget. The client is the bearer
  subject when there is one, else the remote address (behind a proxy, run uvicorn with
  ``--proxy-headers`` so that is the real client). Over budget is ``429`` with ``Retry-After``.

The other limits live where they are enforced: body size (``HERALD_MAX_BODY``, 413) in
:func:`herald.http.commands.read_json_body`; topic names (400) in :func:`herald.protocol.validate_topic`;
topics per connection and WebSocket message size, rate and commands in flight in
:mod:`herald.http.push`; connections per process, client and token, and long polls, in
:mod:`herald.http.admission`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.requests import HTTPConnection

from herald.broker.base import BrokerError
from herald.http.gateway import Gateway
from herald.http.problems import HTTPProblem
from herald.settings import Settings

RATE_WINDOW = 1
"""Seconds in one rate-limit window."""


def check_json_shape(doc: Any, settings: Settings) -> None:
    """Raise a ``422`` problem if ``doc`` nests too deep or holds too long a string."""
    max_depth = settings.max_json_depth
    max_string = settings.max_json_string
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if len(value) > max_string:
                raise HTTPProblem(422, f"a string in the body is longer than {max_string} characters",
                                  kind="json-too-large", max_string=max_string)
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                raise HTTPProblem(422, f"the body nests deeper than {max_depth} levels", kind="json-too-deep",
                                  max_depth=max_depth)
            if isinstance(value, dict):
                for key, item in value.items():
                    if len(key) > max_string:
                        raise HTTPProblem(422, f"a key in the body is longer than {max_string} characters",
                                          kind="json-too-large", max_string=max_string)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def client_of(conn: HTTPConnection, subject: str | None) -> str:
    """Who a rate limit counts: the bearer subject, else the remote address."""
    if subject is not None:
        return "sub:" + subject
    client = conn.client
    return "ip:" + (client.host if client is not None else "unknown")


async def enforce_rate_limit(conn: HTTPConnection, subject: str | None) -> None:
    """Count one command for this client; a ``429`` problem with ``Retry-After`` once over budget."""
    gateway = Gateway.of(conn)
    limit = gateway.settings.command_rate_limit
    if limit <= 0:
        return
    now = time.time()
    window = int(now // RATE_WINDOW)
    try:
        count = await gateway.broker.hit(f"rate:{client_of(conn, subject)}:{window}", RATE_WINDOW)
    except BrokerError:
        return  # fail open: the command itself needs the broker and answers 503 if it is gone
    if count > limit:
        if gateway.metrics is not None:
            gateway.metrics.rejected.labels("rate-limited").inc()
            gateway.metrics.limited("rate-limited")
        retry_after = max(1, math.ceil((window + 1) * RATE_WINDOW - now))
        raise HTTPProblem(429, f"more than {limit} commands per second; slow down", kind="rate-limited",
                          headers={"Retry-After": str(retry_after)}, limit=limit)
