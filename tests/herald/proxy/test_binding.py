"""The CloudEvents HTTP binary mode, pure: the headers a request event becomes."""

from __future__ import annotations

import re

from herald.events import build_event
from herald.proxy.binding import binary_headers, child_traceparent, header_value


def test_every_attribute_the_event_has_becomes_a_ce_header() -> None:
    event = build_event("ThumbnailRequested", {"url": "x"}, source="herald/thumbnails", subject="albums/a",
                        correlationid="op_1", causationid="ev_0", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                        extensions={"tenant": "acme"})
    headers = binary_headers(event)
    assert headers["content-type"] == "application/json"
    assert {k: headers[k] for k in ("ce-specversion", "ce-id", "ce-type", "ce-source", "ce-time", "ce-subject",
                                    "ce-correlationid", "ce-causationid", "ce-tenant")} == {
        "ce-specversion": "1.0", "ce-id": event.id, "ce-type": "ThumbnailRequested", "ce-source": "herald/thumbnails",
        "ce-time": event.time, "ce-subject": "albums/a", "ce-correlationid": "op_1", "ce-causationid": "ev_0",
        "ce-tenant": "acme"}


def test_attributes_the_event_lacks_have_no_header() -> None:
    headers = binary_headers(build_event("ThumbnailRequested", None, source="herald/thumbnails"))
    assert "ce-subject" not in headers and "ce-causationid" not in headers and "ce-correlationid" not in headers


def test_values_outside_printable_ascii_are_percent_encoded() -> None:
    assert header_value("albums/été 2024") == "albums/%C3%A9t%C3%A9%202024"
    assert header_value('a"b%c') == "a%22b%25c"
    assert header_value("plain/ascii-1") == "plain/ascii-1"


def test_the_call_continues_the_commands_trace_with_a_span_of_its_own() -> None:
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    child = child_traceparent(parent)
    assert child.startswith("00-" + "a" * 32 + "-") and child.endswith("-01") and child != parent
    fresh = child_traceparent(None)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", fresh)
    assert child_traceparent("garbage") != child_traceparent("garbage")
