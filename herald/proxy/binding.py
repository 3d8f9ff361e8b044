"""The CloudEvents HTTP binding, binary mode: an event's attributes as ``ce-*`` headers, its data as the body. No I/O.

What a worker sends an upstream for one request event (CloudEvents 1.0 HTTP protocol binding, 3.1)::

    POST <upstream URL>
    content-type: application/json
    ce-specversion: 1.0
    ce-id: <the request event's id: the same on every attempt, so the upstream can deduplicate>
    ce-type, ce-source, ce-time, ce-subject, ce-correlationid, ce-causationid (those the event has)
    traceparent: <the command's trace, with a span of this attempt>
    herald-callback: <absolute URL of /operations/{id}>
    herald-callback-token: <a bearer token for that operation's callback API only>
    herald-attempt: <this attempt's number, from 1>

    <the event's data as JSON>
"""

from __future__ import annotations

import re
import secrets

from herald.events import SPECVERSION, Event

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "%"}
"""Header characters left as they are; the binding percent-encodes the rest (space, '"', '%', non-ASCII)."""


def header_value(value: str) -> str:
    """``value`` percent-encoded as the binding asks (UTF-8 bytes of what is not printable ASCII, and ``"``, ``%``)."""
    if all(c in _SAFE for c in value):
        return value
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in value)


def child_traceparent(traceparent: str | None) -> str:
    """A W3C ``traceparent`` for one call: the command's trace with a new span id, or a new sampled trace."""
    found = _TRACEPARENT.fullmatch(traceparent or "")
    if found is not None and found.group(2) != "0" * 32:
        return f"00-{found.group(2)}-{secrets.token_hex(8)}-{found.group(4)}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def binary_headers(event: Event) -> dict[str, str]:
    """The ``ce-*`` headers, ``content-type`` and ``traceparent`` of ``event`` in binary mode."""
    headers = {
        "content-type": "application/json",
        "ce-specversion": SPECVERSION,
        "ce-id": header_value(event.id),
        "ce-type": event.type,
        "ce-source": header_value(event.source),
        "ce-time": event.time,
    }
    if event.subject is not None:
        headers["ce-subject"] = header_value(event.subject)
    if event.correlationid is not None:
        headers["ce-correlationid"] = header_value(event.correlationid)
    if event.causationid is not None:
        headers["ce-causationid"] = header_value(event.causationid)
    for name, value in event.extensions.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        headers[f"ce-{name}"] = header_value(text)
    headers["traceparent"] = child_traceparent(event.traceparent)
    return headers
