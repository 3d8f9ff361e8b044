"""The Mercure protocol without I/O: publish forms, selectors, claims, and the SSE bytes of an update."""

from __future__ import annotations

import orjson
import pytest

from herald.events import decode_event
from herald.mercure import (
    ANONYMOUS,
    EVENT_TYPE,
    FIREHOSE,
    Claims,
    MercureError,
    MercureFrame,
    Selector,
    Update,
    new_update_id,
    parse_publish_form,
    selector,
    selectors,
)
from herald.protocol import Frame, ProtocolError, validate_topic
from herald.uritemplate import Template


def parse(body: bytes, max_topics: int = 8) -> Update:
    return parse_publish_form(body, max_topics=max_topics, new_id=lambda: "urn:uuid:generated")


# Rendering -----------------------------------------------------------------------------------

def test_an_update_is_rendered_byte_for_byte_as_the_reference_hub_writes_it() -> None:
    update = Update(("https://example.com/books/1",), '{"title": "Dune"}', "urn:uuid:1")
    assert update.render() == b'id: urn:uuid:1\ndata: {"title": "Dune"}\n\n'


def test_type_and_retry_come_first_then_the_id_and_one_data_line_per_line() -> None:
    update = Update(("t",), "a\r\nb\rc\n\nd\n", "7", type="book.updated", retry=2500)
    assert update.render() == (b"event: book.updated\nretry: 2500\nid: 7\n"
                               b"data: a\ndata: b\ndata: c\ndata: \ndata: d\ndata: \n\n")


def test_an_update_without_data_still_has_its_data_line() -> None:
    assert Update(("t",), "", "x").render() == b"id: x\ndata: \n\n"


# Publish forms ---------------------------------------------------------------------------------

def test_the_form_symfony_sends_is_read_field_by_field() -> None:
    body = (b"topic=https%3A%2F%2Fexample.com%2Fbooks%2F1&topic=https%3A%2F%2Fexample.com%2Fusers%2Fdunglas"
            b"%2F%3Ftopic%3Dhttps%253A%252F%252Fexample.com%252Fbooks%252F1&data=%7B%22title%22%3A%22Les+Mis"
            b"%C3%A9rables%22%7D&private=on&id=urn%3Auuid%3A9b3f&type=book.updated&retry=1000")
    assert parse(body) == Update(
        topics=("https://example.com/books/1",
                "https://example.com/users/dunglas/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1"),
        data='{"title":"Les Misérables"}',
        id="urn:uuid:9b3f",
        private=True,
        type="book.updated",
        retry=1000,
    )


def test_optional_fields_default_as_the_reference_hub_reads_them() -> None:
    assert parse(b"topic=t") == Update(("t",), "", "urn:uuid:generated")
    # an empty id, type or retry is unset; retry=0 too; private with any value (even none) is set
    assert parse(b"topic=t&id=&type=&retry=0&private") == Update(("t",), "", "urn:uuid:generated", private=True)
    # the first of each repeated field counts; unknown fields are ignored
    assert parse(b"topic=t&data=one&data=two&id=a&id=b&foo=bar") == Update(("t",), "one", "a")


def test_a_generated_id_is_a_uuid_urn() -> None:
    made = new_update_id()
    assert made.startswith("urn:uuid:") and len(made) == len("urn:uuid:") + 36 and made != new_update_id()


@pytest.mark.parametrize(("body", "kind"), [
    (b"data=no+topic", "missing-topic"),
    (b"topic=", "bad-topic"),
    (b"topic=a%0Ab", "bad-topic"),  # a line break in a topic
    (b"topic=a&id=%23fragment", "bad-id"),  # ids starting with "#" are the hub's
    (b"topic=a&id=earliest", "bad-id"),  # reserved for Last-Event-ID
    (b"topic=a&id=x%0Aevent%3A+forged", "bad-id"),  # would inject an SSE field
    (b"topic=a&type=t%0Adata%3A+forged", "bad-type"),
    (b"topic=a&retry=soon", "bad-retry"),
    (b"topic=a&retry=-1", "bad-retry"),
    (b"topic=%FF", "bad-form"),  # not UTF-8
    (b"topic=1&topic=2&topic=3", "too-many-topics"),
])
def test_a_form_that_is_no_update_is_a_400_naming_the_field(body: bytes, kind: str) -> None:
    with pytest.raises(MercureError) as caught:
        parse(body, max_topics=2)
    assert caught.value.status == 400 and caught.value.kind == kind


# Storage ---------------------------------------------------------------------------------------

def test_an_update_is_stored_as_a_cloudevent_and_read_back_unchanged() -> None:
    update = Update(("https://example.com/books/1", "alt"), "a\nb", "urn:uuid:1", private=True, type="x", retry=10)
    event = update.to_event()
    doc = orjson.loads(event.encoded)
    assert (doc["id"], doc["type"], doc["source"], doc["subject"]) == (
        "urn:uuid:1", EVENT_TYPE, "/.well-known/mercure", "https://example.com/books/1")
    assert doc["data"] == {"topics": ["https://example.com/books/1", "alt"], "data": "a\nb", "private": True,
                           "type": "x", "retry": 10}
    assert b"\n" not in event.encoded  # storable as one SSE line by Herald's own framing too
    stored = decode_event(event.encoded)
    assert Update.from_event(stored.id, stored.data) == update
    live = MercureFrame.of(Frame(FIREHOSE, "5-0", EVENT_TYPE, event.encoded))
    assert (live.update, live.message, live.cursor, live.topic) == (update, update.render(), "5-0", FIREHOSE)
    assert MercureFrame.stored("5-0", stored).message == update.render()


@pytest.mark.parametrize("data", [None, [], {"topics": []}, {"topics": ["t"]}, {"topics": ["t"], "data": 1},
                                  {"topics": ["t"], "data": "", "retry": "5"}])
def test_an_event_that_holds_no_update_is_refused(data: object) -> None:
    with pytest.raises(ValueError):
        Update.from_event("x", data)


def test_the_firehose_is_out_of_reach_of_herald_topic_names() -> None:
    with pytest.raises(ProtocolError):
        validate_topic(FIREHOSE)


# Selectors and claims ----------------------------------------------------------------------------

def test_selectors_match_as_the_draft_says() -> None:
    assert selector("*").matches("anything at all")
    assert selector("https://example.com/books/1").matches("https://example.com/books/1")
    assert not selector("https://example.com/books/1").matches("https://example.com/books/2")
    assert selector("https://example.com/books/{id}").matches("https://example.com/books/2")
    # a template matches itself too (a claim selector may be compared with a subscription's template)
    assert selector("https://example.com/books/{id}").matches("https://example.com/books/{id}")
    # not a template: only itself
    assert selector("https://example.com/{broken").matches("https://example.com/{broken")
    assert not selector("https://example.com/{broken").matches("https://example.com/x")
    assert selectors(["a", "b", "a"]) == (selector("a"), selector("b"))
    assert selector("x") is selector("x")  # compiled once, shared
    assert Selector("https://example.com/{id}", Template("https://example.com/{id}")) == selector(
        "https://example.com/{id}")  # equal by their source (the router indexes subscriptions by selector)


def test_publish_claims_must_cover_every_topic_of_an_update() -> None:
    claims = Claims.of({"mercure": {"publish": ["https://example.com/books/{id}"]}})
    assert claims.may_publish(["https://example.com/books/1"])
    assert not claims.may_publish(["https://example.com/books/1", "https://example.com/users/1"])
    assert Claims.of({"mercure": {"publish": ["*"]}}).may_publish(["a", "b"])
    assert not Claims.of({"mercure": {"publish": []}}).may_publish(["a"])
    assert not Claims.of({}).may_publish(["a"])
    assert Claims.of({}).publish is None and Claims.of({"mercure": {"publish": []}}).publish == ()


def test_a_private_update_needs_a_subscribe_claim_matching_one_of_its_topics() -> None:
    private = Update(("https://example.com/books/1", "https://example.com/users/ann/?topic=books%2F1"), "",
                     "1", private=True)
    ann = Claims.of({"mercure": {"subscribe": ["https://example.com/users/ann/{?topic}"]}})
    bob = Claims.of({"mercure": {"subscribe": ["https://example.com/users/bob/{?topic}"]}})
    assert ann.may_receive(private) and not bob.may_receive(private) and not ANONYMOUS.may_receive(private)
    public = Update(private.topics, "", "2")
    assert ann.may_receive(public) and bob.may_receive(public) and ANONYMOUS.may_receive(public)


def test_claims_keep_the_tokens_expiry() -> None:
    assert Claims.of({"exp": 1_900_000_000}).expires_at == 1_900_000_000
    assert Claims.of({}).expires_at == 0


@pytest.mark.parametrize("payload", [{"mercure": "all"}, {"mercure": {"publish": "*"}},
                                     {"mercure": {"subscribe": [1]}}, {"mercure": {"subscribe": [""]}}])
def test_a_malformed_mercure_claim_makes_the_token_invalid(payload: dict[str, object]) -> None:
    with pytest.raises(MercureError) as caught:
        Claims.of(payload)
    assert caught.value.status == 401
