"""The CloudEvents envelope: build, validate (every error path), encode once, decode."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from herald.events import (
    SPECVERSION,
    Event,
    EventError,
    build_event,
    decode_event,
    event_from_dict,
    new_event_id,
    now_iso,
)
from herald.protocol import Frame


def envelope(**overrides: Any) -> dict[str, Any]:
    """A valid envelope dict, with ``overrides`` applied (``None`` removes a key)."""
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1",
        "source": "herald/test",
        "type": "ChatMessageSent",
        "time": "2024-05-01T12:00:00.000Z",
        "datacontenttype": "application/json",
        "correlationid": "op_1",
        "causationid": "e0",
        "data": {"text": "hi"},
    }
    for key, value in overrides.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def test_build_event_fills_id_time_and_extensions() -> None:
    event = build_event("ChatMessageSent", {"a": 1}, source="herald/x", subject="chats/lobby",
                        correlationid="op_1", causationid="e0")
    doc = event.to_dict()
    assert doc["specversion"] == SPECVERSION
    assert doc["type"] == "ChatMessageSent"
    assert doc["source"] == "herald/x"
    assert doc["subject"] == "chats/lobby"
    assert doc["correlationid"] == "op_1"
    assert doc["causationid"] == "e0"
    assert doc["datacontenttype"] == "application/json"
    assert doc["data"] == {"a": 1}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert len(event.id) >= 20


def test_build_event_leaves_unset_optional_attributes_out() -> None:
    doc = build_event("Thing", source="s").to_dict()
    for name in ("subject", "correlationid", "causationid", "traceparent"):
        assert name not in doc
    assert doc["data"] is None


def test_event_ids_are_unique_and_url_safe() -> None:
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_\-]+", i) for i in ids)


def test_now_iso_is_utc_rfc3339_with_milliseconds() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now_iso())


@pytest.mark.parametrize(
    ("type_", "message"),
    [
        ("", "must be 1-128"),
        ("9Starts", "must be 1-128"),
        ("has space", "must be 1-128"),
        ("x" * 129, "must be 1-128"),
        ("new\nline", "must be 1-128"),
        ("Trailing\n", "must be 1-128"),
    ],
)
def test_build_event_refuses_bad_types(type_: str, message: str) -> None:
    with pytest.raises(EventError, match=message):
        build_event(type_, source="s")


def test_build_event_refuses_empty_source() -> None:
    with pytest.raises(EventError, match="source must not be empty"):
        build_event("Thing", source="")


@pytest.mark.parametrize("name", ["data", "correlationid", "Upper", "with-dash", "x" * 21, "", "tenant\n"])
def test_build_event_refuses_bad_extension_names(name: str) -> None:
    with pytest.raises(EventError, match="extension attribute"):
        build_event("Thing", source="s", extensions={name: "v"})


def test_build_event_keeps_good_extensions() -> None:
    event = build_event("Thing", source="s", extensions={"tenant": "acme", "shard7": 7})
    assert event.to_dict()["tenant"] == "acme"
    assert event.to_dict()["shard7"] == 7


def test_event_is_immutable() -> None:
    event = build_event("Thing", source="s")
    with pytest.raises(AttributeError, match="immutable"):
        event.type = "Other"  # type: ignore[misc]


def test_encoded_is_computed_once_and_the_same_object_is_reused() -> None:
    event = build_event("Thing", {"n": 1}, source="s")
    first = event.encoded
    assert event.encoded is first
    assert orjson.loads(first) == event.to_dict()
    assert b" " not in first.replace(b"Thing", b"")  # compact JSON: one SSE data line


def test_decode_keeps_the_original_bytes_as_the_encoding() -> None:
    raw = orjson.dumps(envelope())
    event = decode_event(raw)
    assert event.encoded is not None
    assert event.encoded == raw
    assert event.encoded is event.encoded
    assert event.correlationid == "op_1"
    assert event.causationid == "e0"
    assert event.data == {"text": "hi"}


def test_decode_of_pretty_printed_json_encodes_afresh_on_one_line() -> None:
    raw = orjson.dumps(envelope(), option=orjson.OPT_INDENT_2)
    event = decode_event(raw.replace(b"\n", b"\r\n"))
    assert b"\n" not in event.encoded and b"\r" not in event.encoded
    assert orjson.loads(event.encoded) == orjson.loads(raw)
    assert Frame("t", "1-0", event.type, event.encoded).sse.count(b"\n") == 4  # id, event, data, blank line


def test_decode_accepts_str_and_round_trips() -> None:
    original = build_event("Thing", {"x": [1, 2]}, source="s", correlationid="op_9", subject="t/1")
    again = decode_event(original.encoded.decode())
    assert again == original
    assert again.encoded == original.encoded


def test_decode_without_time_stamps_now() -> None:
    event = event_from_dict(envelope(time=None))
    assert re.fullmatch(r"\d{4}-.*Z", event.time)


def test_decode_keeps_unknown_valid_extensions() -> None:
    event = event_from_dict(envelope(tenant="acme", priority=3, urgent=True))
    assert event.extensions == {"tenant": "acme", "priority": 3, "urgent": True}
    assert event.to_dict()["tenant"] == "acme"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ("text", "must be a JSON object"),
        (envelope(specversion=None), "'specversion' is required"),
        (envelope(id=None), "'id' is required"),
        (envelope(id=""), "'id' is required"),
        (envelope(id=5), "'id' is required"),
        (envelope(source=None), "'source' is required"),
        (envelope(type=None), "'type' is required"),
        (envelope(specversion="0.3"), "'specversion' must be '1.0'"),
        (envelope(type="bad type"), "'type' must be 1-128"),
        (envelope(type="Newline\n"), "'type' must be 1-128"),
        (envelope(datacontenttype="text/plain"), "'datacontenttype' must be 'application/json'"),
        (envelope(time=12), "'time' must be an RFC 3339 string"),
        (envelope(time="yesterday"), "'time' must be an RFC 3339 timestamp"),
        (envelope(Bad="x"), "unknown attribute 'Bad'"),
        (envelope(**{"tenant\n": "x"}), "unknown attribute 'tenant\\n'"),
        (envelope(meta={"a": 1}), "extension 'meta' must be a string, integer or boolean"),
        (envelope(subject=""), "'subject' must be a non-empty string"),
        (envelope(correlationid=7), "'correlationid' must be a non-empty string"),
        (envelope(causationid=""), "'causationid' must be a non-empty string"),
        (envelope(traceparent=["x"]), "'traceparent' must be a non-empty string"),
    ],
)
def test_event_from_dict_says_what_is_wrong(doc: Any, message: str) -> None:
    with pytest.raises(EventError, match=re.escape(message)):
        event_from_dict(doc)


def test_decode_refuses_invalid_json() -> None:
    with pytest.raises(EventError, match="not valid JSON"):
        decode_event(b"{nope")


def test_equality_is_by_content() -> None:
    doc = envelope()
    assert event_from_dict(doc) == event_from_dict(dict(doc))
    assert event_from_dict(doc) != event_from_dict(envelope(data={"text": "other"}))
    assert event_from_dict(doc) != "not an event"
    assert hash(event_from_dict(doc)) == hash(event_from_dict(doc))


def test_repr_names_type_id_and_correlation() -> None:
    event = Event(id="e1", source="s", type="T", time="2024-01-01T00:00:00Z", correlationid="op_1")
    assert repr(event) == "Event(type='T', id='e1', correlationid='op_1')"
