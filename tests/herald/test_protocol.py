"""SSE and WebSocket framing (exact bytes), cursors, vector cursors, topics, client frames."""

from __future__ import annotations

import orjson
import pytest

from herald.events import build_event
from herald.protocol import (
    SSE_HEADERS,
    SSE_HEARTBEAT,
    ClientFrame,
    Frame,
    ProtocolError,
    format_cursor,
    format_epoch,
    format_vector_cursor,
    history_lost,
    is_terminal_type,
    join_cursor,
    parse_client_frame,
    parse_cursor,
    parse_vector_cursor,
    split_cursor,
    sse_control,
    sse_frame,
    sse_retry,
    validate_topic,
    ws_message,
)

# SSE bytes -------------------------------------------------------------------------------


def test_sse_frame_exact_bytes_with_and_without_id() -> None:
    assert sse_frame("ChatMessageSent", b'{"a":1}', "17-3") == b'id: 17-3\nevent: ChatMessageSent\ndata: {"a":1}\n\n'
    assert sse_frame("T", b"{}") == b"event: T\ndata: {}\n\n"


@pytest.mark.parametrize(("name", "data"), [("a\nb", b"{}"), ("a\rb", b"{}"), ("T", b"{\n}"), ("T", b"{\r}")])
def test_sse_frame_refuses_line_breaks(name: str, data: bytes) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        sse_frame(name, data)


def test_sse_retry_heartbeat_and_headers_exact_bytes() -> None:
    assert sse_retry(2000) == b"retry: 2000\n\n"
    assert sse_retry(0) == b"retry: 0\n\n"
    assert SSE_HEARTBEAT == b":\n\n"
    headers = dict(SSE_HEADERS)
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"x-accel-buffering"] == b"no"


def test_sse_control_is_a_compact_json_message() -> None:
    assert sse_control("herald.gap", {"topic": "t", "oldest": "1-0"}) == (
        b'event: herald.gap\ndata: {"topic":"t","oldest":"1-0"}\n\n'
    )
    assert sse_control("herald.disconnect", {"reason": "x"}, "5-0").startswith(b"id: 5-0\n")


def test_frame_sse_tail_and_ws_exact_bytes() -> None:
    frame = Frame("chats/lobby", "1700000000000-2", "ChatMessageDelivered", b'{"id":"e1"}')
    assert frame.sse_tail == b'event: ChatMessageDelivered\ndata: {"id":"e1"}\n\n'
    assert frame.sse == b'id: 1700000000000-2\nevent: ChatMessageDelivered\ndata: {"id":"e1"}\n\n'
    assert frame.ws == '{"type":"event","topic":"chats/lobby","cursor":"1700000000000-2","event":{"id":"e1"}}'
    assert frame.key == (1700000000000, 2)
    assert not frame.terminal


def test_a_frame_carries_its_cursor_with_the_epoch_in_both_transports() -> None:
    frame = Frame("chats/lobby", "1700000000000-2.k3x9qa", "T", b"{}")
    assert frame.sse == b"id: 1700000000000-2.k3x9qa\nevent: T\ndata: {}\n\n"
    assert frame.ws == '{"type":"event","topic":"chats/lobby","cursor":"1700000000000-2.k3x9qa","event":{}}'
    assert (frame.key, frame.epoch) == ((1700000000000, 2), "k3x9qa")
    assert Frame("t", "1-0", "T", b"{}").epoch is None


def test_frame_is_framed_once_and_shared() -> None:
    frame = Frame("t", "1-0", "T", b"{}")
    assert frame.sse is frame.sse
    assert frame.sse_tail is frame.sse_tail
    assert frame.ws is frame.ws


def test_frame_ws_escapes_the_topic_as_json() -> None:
    frame = Frame('we"ird', "1-0", "T", b"{}")
    assert orjson.loads(frame.ws)["topic"] == 'we"ird'


def test_frame_from_event_reuses_the_event_encoding_and_knows_terminal_types() -> None:
    event = build_event("herald.operation.succeeded", {"x": 1}, source="s")
    frame = Frame.from_event("operations/op_1", "5-0", event)
    assert frame.encoded is event.encoded
    assert frame.terminal
    assert orjson.loads(frame.ws)["event"] == event.to_dict()
    assert not Frame.from_event("t", "5-0", build_event("herald.operation.running", source="s")).terminal


@pytest.mark.parametrize(
    ("event_type", "terminal"),
    [
        ("herald.operation.succeeded", True),
        ("herald.operation.failed", True),
        ("herald.operation.canceled", True),
        ("herald.operation.running", False),
        ("herald.operation.progress", False),
        ("ChatMessageDelivered", False),
    ],
)
def test_terminal_event_types(event_type: str, terminal: bool) -> None:
    assert is_terminal_type(event_type) is terminal


def test_ws_message_is_compact_json_text() -> None:
    assert ws_message("pong", id=3) == '{"type":"pong","id":3}'
    assert ws_message("subscribed", topic="a", cursor=None, id=None) == (
        '{"type":"subscribed","topic":"a","cursor":null,"id":null}'
    )


# Cursors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "parsed"), [("0-0", (0, 0)), ("123-4", (123, 4)), ("1700000000000-15", (1700000000000, 15))]
)
def test_parse_cursor(raw: str, parsed: tuple[int, int]) -> None:
    assert parse_cursor(raw) == parsed
    assert format_cursor(parsed) == raw


@pytest.mark.parametrize(
    "raw",
    ["", "abc", "1", "1-", "-1", "1-2-3", " 1-2", "1-2 ", "1-2\n", "1-2\r", "1_2", "+1-2", "1-x",
     "\uff11-\uff12",  # fullwidth digits, which int() would take
     "1" * 17 + "-0", "0-" + "1" * 17, "1.5-2", "\x00"],
)
def test_parse_cursor_refuses_garbage(raw: str) -> None:
    with pytest.raises(ProtocolError, match="is not of the form"):
        parse_cursor(raw)


def test_cursors_order_by_number_not_by_text() -> None:
    assert parse_cursor("9-0") < parse_cursor("10-0")
    assert parse_cursor("10-2") < parse_cursor("10-10")


@pytest.mark.parametrize(
    ("raw", "position", "epoch"),
    [
        ("1712345678901-0.k3x9qa", (1712345678901, 0), "k3x9qa"),
        ("5-2.0", (5, 2), "0"),
        ("0-0.zzzzzzzz", (0, 0), "zzzzzzzz"),
        ("123-4", (123, 4), None),  # a plain cursor, as before epochs
    ],
)
def test_a_cursor_is_a_position_and_the_epoch_of_its_history(
    raw: str, position: tuple[int, int], epoch: str | None
) -> None:
    assert split_cursor(raw) == (position, epoch)
    assert parse_cursor(raw) == position
    assert format_cursor(position, epoch) == raw
    assert join_cursor(format_cursor(position), epoch) == raw


@pytest.mark.parametrize(
    "raw",
    ["1-0.", "1-0.K3X9", "1-0.abcdefghi", "1-0.a,b", "1-0.a b", "1-0..a", "1-0.a.b", "1-0.a\n", "1-0.a-b",
     "1-0.\uff41", ".a", "a.1-0", "1-0:a"],
)
def test_an_epoch_is_one_to_eight_lowercase_letters_or_digits(raw: str) -> None:
    with pytest.raises(ProtocolError, match="is not of the form"):
        split_cursor(raw)


@pytest.mark.parametrize(
    ("number", "epoch"), [(0, "0"), (35, "z"), (36, "10"), (2176782335, "zzzzzz"), (36**8 - 1, "zzzzzzzz")]
)
def test_format_epoch_is_base_36(number: int, epoch: str) -> None:
    assert format_epoch(number) == epoch
    assert split_cursor(f"1-0.{epoch}")[1] == epoch


@pytest.mark.parametrize("number", [-1, 36**8])
def test_format_epoch_refuses_what_does_not_fit(number: int) -> None:
    with pytest.raises(ValueError):
        format_epoch(number)


def test_a_cursor_of_another_epoch_or_of_a_history_that_is_gone_is_lost_and_a_plain_one_never() -> None:
    assert not history_lost("k3x9", "k3x9")
    assert history_lost("k3x9", "a1b2")
    assert history_lost("k3x9", None)  # the topic has no history now
    assert not history_lost(None, "a1b2")
    assert not history_lost(None, None)


def test_vector_cursor_round_trip_with_empty_slots() -> None:
    assert parse_vector_cursor("1-0,,3-4", 3) == ["1-0", None, "3-4"]
    assert format_vector_cursor(["1-0", None, "3-4"]) == "1-0,,3-4"
    assert parse_vector_cursor(",", 2) == [None, None]
    assert parse_vector_cursor("5-5", 1) == ["5-5"]
    assert parse_vector_cursor("1-0.k3x9,,3-4.a1", 3) == ["1-0.k3x9", None, "3-4.a1"]
    assert format_vector_cursor(["1-0.k3x9", None, "3-4"]) == "1-0.k3x9,,3-4"


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        ("1-0", 2, "cursor has 1 slots but the stream follows 2 topics"),
        ("1-0,2-0,3-0", 2, "cursor has 3 slots"),
        ("1-0,zz", 2, "is not of the form"),
        ("1-0, 2-0", 2, "is not of the form"),
        ("1-0;2-0", 2, "cursor has 1 slots"),
    ],
)
def test_vector_cursor_refuses_garbage(raw: str, count: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_vector_cursor(raw, count)


# Topics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["chats/lobby", "operations/op_AbC-12_x", "a", "a/b/c/d", "user:42@acme/x.y", "x" * 128, "chats/a..b"],
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "/chats",
        "chats/",
        "chats//lobby",
        "a/b/c/d/e",
        "..",
        "chats/..",
        "chats/../operations/op_1",
        "chats/.",
        "./chats",
        ".hidden",
        "chats/lobby\n",
        "chats/lob\x00by",
        "chats/lob\tby",
        "chats/\x7f",
        "chats lobby",
        "chats/lobby?x=1",
        "chats/lobby#x",
        "chats/lo%2fby",
        "chats/é",
        "x" * 129,
        "a/" + "b" * 128 + "/" + "c" * 128,  # every segment fine, but over 200 characters
    ],
)
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(ProtocolError, match="topic names are 1-200 characters"):
        validate_topic(topic)


# Client frames ---------------------------------------------------------------------------


def test_parse_subscribe_with_cursor_token_and_id() -> None:
    frame = parse_client_frame('{"type":"subscribe","topic":"chats/a","cursor":"5-1","token":"tok","id":"r1"}')
    assert frame == ClientFrame(type="subscribe", topic="chats/a", cursor="5-1", token="tok", id="r1")
    frame = parse_client_frame('{"type":"subscribe","topic":"chats/a","cursor":"5-1.k3x9"}')
    assert frame.cursor == "5-1.k3x9"


def test_parse_unsubscribe_ping_and_bytes_input() -> None:
    assert parse_client_frame(b'{"type":"unsubscribe","topic":"chats/a"}') == ClientFrame("unsubscribe", "chats/a")
    assert parse_client_frame('{"type":"ping","id":7}') == ClientFrame(type="ping", id=7)
    assert parse_client_frame('{"type":"ping"}') == ClientFrame(type="ping")


def test_parse_command() -> None:
    frame = parse_client_frame(
        '{"type":"command","id":1,"method":"POST","path":"/chats/a/messages",'
        '"headers":{"Idempotency-Key":"k"},"body":{"author":"a","text":"t"}}'
    )
    assert frame.type == "command"
    assert frame.id == 1
    assert frame.command == {"method": "POST", "path": "/chats/a/messages", "body": {"author": "a", "text": "t"},
                             "headers": {"Idempotency-Key": "k"}}
    bare = parse_client_frame('{"type":"command","method":"POST","path":"/x"}')
    assert bare.command == {"method": "POST", "path": "/x", "body": None, "headers": {}}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "message is not valid JSON"),
        (b"\xff\xfe", "message is not valid JSON"),
        ("[1,2]", "message must be a JSON object"),
        ('"ping"', "message must be a JSON object"),
        ("{}", "unknown message type 'None'"),
        ('{"type":"publish","topic":"a"}', "unknown message type 'publish'"),
        ('{"type":7}', "unknown message type '7'"),
        ('{"type":"ping","id":[1]}', "'id' must be a string or an integer"),
        ('{"type":"ping","id":{"a":1}}', "'id' must be a string or an integer"),
        ('{"type":"subscribe"}', "'subscribe' needs a 'topic' string"),
        ('{"type":"unsubscribe","topic":5}', "'unsubscribe' needs a 'topic' string"),
        ('{"type":"subscribe","topic":"chats/../x"}', "topic names are"),
        ('{"type":"subscribe","topic":"a","cursor":5}', "'cursor' must be a string"),
        ('{"type":"subscribe","topic":"a","cursor":"nope"}', "is not of the form"),
        ('{"type":"subscribe","topic":"a","token":1}', "'token' must be a string"),
        ('{"type":"command","path":"/x"}', "a command needs 'method' as a string"),
        ('{"type":"command","method":"POST"}', "a command needs 'path' as a string"),
        ('{"type":"command","method":"POST","path":"/x","headers":[]}', "'headers' must be an object of strings"),
        ('{"type":"command","method":"POST","path":"/x","headers":{"a":1}}', "'headers' must be an object of strings"),
    ],
)
def test_parse_client_frame_errors(raw: str | bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(raw)
    assert message in str(caught.value)


def test_unknown_type_error_lists_the_expected_types() -> None:
    with pytest.raises(ProtocolError, match=r"\['command', 'ping', 'subscribe', 'unsubscribe'\]"):
        parse_client_frame('{"type":"nope"}')


def test_a_ws_text_frame_is_the_unmasked_frame_websockets_writes_at_every_length_boundary() -> None:
    from websockets.frames import Frame as WSFrame
    from websockets.frames import Opcode

    from herald.protocol import ws_text_frame

    for size in (0, 125, 126, 65535, 65536):
        payload = b"x" * size
        assert ws_text_frame(payload) == WSFrame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    frame = Frame("chats/a", "1-0.e", "Tick", b'{"n":1}')
    assert frame.ws_frame == ws_text_frame(frame.ws.encode()) and frame.ws_frame is frame.ws_frame
