"""Hostile and broken input, as a table: every row gets its 4xx (or WebSocket close code), never a 5xx.

The rows go to one real uvicorn process over raw sockets (so nothing is cleaned up by a client
library on the way), except the WebSocket rows that a client library can send as they are.
After the whole table the same process still serves a newcomer over HTTP, SSE and WebSocket,
and every operation accepted before the table is still there and finished.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import websockets

from herald.auth import TokenSigner
from tests.support.server import TEST_SECRET, HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

SEND = "/chats/lobby/messages"
GOOD = b'{"author": "ann", "text": "hi"}'
MAX_WS = 4096
PROBLEM = "application/problem+json"

FORGED = TokenSigner("not-the-server-secret-0123456789").issue(["chats/lobby"])
EXPIRED = TokenSigner(TEST_SECRET).issue(["chats/lobby"], ttl=-60)
OTHER_ROOM = TokenSigner(TEST_SECRET).issue(["chats/other"])
LOBBY = TokenSigner(TEST_SECRET).issue(["chats/lobby"])
TWO_ROOMS = TokenSigner(TEST_SECRET).issue(["chats/lobby", "chats/b"])


@dataclass(frozen=True)
class Http:
    """A raw HTTP/1.1 request and the status (or statuses) it must get."""

    method: str
    path: str
    expect: int | tuple[int, ...]
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    raw_head: bytes | None = None  # header lines sent as they are (for bytes a client library refuses)
    problem: bool = True  # False: refused by the HTTP parser before the app (uvicorn's plain 400)


@dataclass(frozen=True)
class Ws:
    """WebSocket messages to send, and what must come back: an ``error`` frame or a close code."""

    messages: list[str | bytes]
    error_status: int | None = None  # an error frame (with this status, if it has one) and the socket stays open
    close_code: int | None = None
    query: str = ""


@dataclass(frozen=True)
class RawWs:
    """A WebSocket frame built by hand (opcode, payload), and the close code it must get."""

    opcode: int
    payload: bytes
    close_code: int


def json_post(body: bytes, *, path: str = SEND, expect: int | tuple[int, ...] = 422, **kw: object) -> Http:
    """A POST of ``body`` as JSON."""
    headers = [("Content-Type", "application/json"), *kw.pop("headers", [])]  # type: ignore[misc]
    return Http("POST", path, expect, headers=headers, body=body, **kw)  # type: ignore[arg-type]


def sse(path: str, expect: int, *headers: tuple[str, str]) -> Http:
    """A GET of an SSE stream."""
    return Http("GET", path, expect, headers=[("Accept", "text/event-stream"), *headers])


def deep(levels: int) -> bytes:
    """A command whose text nests ``levels`` arrays deep."""
    return b'{"author": "ann", "text": ' + b"[" * levels + b"1" + b"]" * levels + b"}"


TABLE: dict[str, Http | Ws | RawWs] = {
    # JSON that is not JSON, or not UTF-8
    "truncated-json": json_post(b'{"author": "ann", "text":', expect=400),
    "non-utf8-json": json_post(b'{"author": "\xff\xfe", "text": "x"}', expect=400),
    "utf16-json-with-bom": json_post('{"author": "a", "text": "x"}'.encode("utf-16"), expect=400),
    "empty-body": json_post(b"", expect=400),
    "json-nan": json_post(b'{"author": "a", "text": NaN}', expect=400),
    "trailing-garbage": json_post(GOOD + b"}}}", expect=400),
    "array-body": json_post(b"[]"),
    "null-body": json_post(b"null"),
    "string-body": json_post(b'"hello"'),
    # content types
    "text-plain": Http("POST", SEND, 415, headers=[("Content-Type", "text/plain")], body=GOOD),
    "no-content-type": Http("POST", SEND, 415, body=GOOD),
    "form-urlencoded": Http("POST", SEND, 415, headers=[("Content-Type", "application/x-www-form-urlencoded")],
                            body=b"author=a&text=b"),
    "multipart": Http("POST", SEND, 415, headers=[("Content-Type", "multipart/form-data; boundary=x")], body=GOOD),
    # sizes
    "body-over-limit": json_post(b'{"author": "a", "text": "' + b"x" * 70000 + b'"}', expect=413),
    "absurd-content-length": Http("POST", SEND, 413, headers=[("Content-Type", "application/json"),
                                                              ("Content-Length", "999999999999")]),
    "content-length-not-a-number": Http("POST", SEND, 400, raw_head=b"Content-Type: application/json\r\n"
                                        b"Content-Length: ten\r\n", problem=False),
    "chunked-over-limit": Http("POST", SEND, 413, raw_head=b"Content-Type: application/json\r\n"
                               b"Transfer-Encoding: chunked\r\n", body=b"".join(
                                   b"4000\r\n" + b"[" * 0x4000 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"),
    "nesting-too-deep": json_post(deep(100)),
    "nesting-beyond-the-parser": json_post(deep(5000)),
    # fields
    "unknown-field": json_post(b'{"author": "a", "text": "x", "admin": true}'),
    "author-wrong-type": json_post(b'{"author": 5, "text": "x"}'),
    "text-as-object": json_post(b'{"author": "a", "text": {"$gt": ""}}'),
    "text-too-long": json_post(b'{"author": "a", "text": "' + b"x" * 2001 + b'"}'),
    "author-control-chars": json_post(b'{"author": "a\\u0000b", "text": "x"}'),
    "missing-fields": json_post(b"{}"),
    "read-receipt-bad-message-id": json_post(b'{"reader": "bo"}', path="/chats/lobby/messages/../read", expect=404),
    # Prefer and ?wait=: ignored or capped, never obeyed blindly (HERALD_MAX_WAIT=1 here)
    "prefer-wait-absurd": json_post(GOOD, expect=(200, 202), headers=[("Prefer", "wait=99999999999999999999")]),
    "prefer-wait-negative": json_post(GOOD, expect=202, headers=[("Prefer", "wait=-5")]),
    "prefer-garbage": json_post(GOOD, expect=202, headers=[("Prefer", 'wait="; respond-async=1, ,,=')]),
    "prefer-wait-superscript": json_post(GOOD, expect=202, raw_head=b"Prefer: wait=\xb2\r\n"),  # was a 500
    "wait-not-a-number": Http("GET", "/operations/{op}?wait=soon", 400),
    "wait-negative": Http("GET", "/operations/{op}?wait=-1", 400),
    "wait-infinite": Http("GET", "/operations/{op}?wait=1e999", 400),
    "wait-nan": Http("GET", "/operations/{op}?wait=nan", 400),
    # ids and paths
    "operation-id-huge": Http("GET", "/operations/" + "a" * 500, 404),
    "operation-id-traversal": Http("GET", "/operations/..%2f..%2fetc%2fpasswd", 404),
    "operation-id-dot-dot": Http("GET", "/operations/../../etc/passwd", 404),
    "cancel-unknown": Http("DELETE", "/operations/op_doesnotexist", 404),
    "room-with-space": Http("GET", "/chats/bad%20room", 404),
    "room-too-long": json_post(GOOD, path="/chats/" + "r" * 65 + "/messages", expect=404),
    "limit-not-a-number": Http("GET", "/chats/lobby/messages?limit=all", 400),
    "limit-absurd": Http("GET", "/chats/lobby/messages?limit=100000000", 400),
    "method-not-allowed": Http("PUT", SEND, 405, headers=[("Content-Type", "application/json")], body=GOOD),
    "unknown-path": Http("GET", "/admin/../../../../etc/shadow", 404),
    # header injection and hostile headers
    "idempotency-key-too-long": json_post(GOOD, expect=400, headers=[("Idempotency-Key", "k" * 300)]),
    "idempotency-key-latin1": json_post(GOOD, expect=400, raw_head=b"Idempotency-Key: caf\xe9\r\n"),
    "idempotency-key-bare-cr": json_post(GOOD, expect=400, raw_head=b"Idempotency-Key: a\rInjected: yes\r\n",
                                         problem=False),
    "idempotency-key-nul": json_post(GOOD, expect=400, raw_head=b"Idempotency-Key: a\x00b\r\n", problem=False),
    "header-without-colon": json_post(GOOD, expect=400, raw_head=b"this is not a header\r\n", problem=False),
    # SSE: cursors, tokens, topics
    "last-event-id-garbage": sse(f"/topics/chats/lobby/events?token={LOBBY}", 400, ("Last-Event-ID", "'; DROP")),
    "last-event-id-huge": sse(f"/topics/chats/lobby/events?token={LOBBY}", 400,
                              ("Last-Event-ID", "99999999999999999999-1")),
    "last-event-id-query-garbage": sse(f"/topics/chats/lobby/events?token={LOBBY}&last_event_id=-1-1", 400),
    "vector-cursor-wrong-count": sse(f"/topics/events?topic=chats/lobby&topic=chats/b&token={TWO_ROOMS}", 400,
                                     ("Last-Event-ID", "1-0,2-0,3-0")),
    "token-missing": sse("/topics/chats/lobby/events", 401),
    "token-forged": sse(f"/topics/chats/lobby/events?token={FORGED}", 401),
    "token-expired": sse(f"/topics/chats/lobby/events?token={EXPIRED}", 401),
    "token-wrong-topic": sse(f"/topics/chats/lobby/events?token={OTHER_ROOM}", 403),
    "token-garbage-huge": sse("/topics/chats/lobby/events?token=" + "A" * 10000, 401),
    "token-in-cookie-forged": sse("/topics/chats/lobby/events", 401, ("Cookie", f"herald_token={FORGED}")),
    "topic-traversal": sse(f"/topics/chats/../../etc/events?token={LOBBY}", 400),
    "topic-control-char": sse(f"/topics/chats/a%01b/events?token={LOBBY}", 400),
    "topic-too-long": sse("/topics/" + "t" * 300 + "/events", 400),
    "topic-empty-segment": sse("/topics/chats//lobby/events", 400),
    "too-many-topics": sse("/topics/events?" + "&".join(f"topic=chats/r{n}" for n in range(65)), 400),
    "operation-events-unknown": sse("/operations/op_nope/events", 401),
    # publishing: never anonymous (no publisher key is set here), an operation's topic never from outside
    "publish-without-token": json_post(b'{"type": "x.y"}', path="/topics/chats/lobby/events", expect=401),
    "publish-forged-token": json_post(b'{"type": "x.y"}', path="/topics/chats/lobby/events", expect=401,
                                      headers=[("Authorization", f"Bearer {FORGED}")]),
    "mercure-publish-without-key": Http("POST", "/.well-known/mercure", 401, body=b"topic=a&data=b",
                                        headers=[("Content-Type", "application/x-www-form-urlencoded")]),
    "mercure-subscribe-anonymous": sse("/.well-known/mercure?topic=https://example.com/a", 401),
    # WebSocket
    "ws-binary-frame": Ws([b"\x00\x01binary"], close_code=1003),
    "ws-oversized-message": Ws(["x" * (MAX_WS + 1)], close_code=1009),
    "ws-invalid-json": Ws(["{not json"], error_status=None),
    "ws-array-message": Ws(["[1, 2]"], error_status=None),
    "ws-unknown-frame-type": Ws(['{"type": "sudo", "id": 1}'], error_status=None),
    "ws-bad-topic": Ws(['{"type": "subscribe", "topic": "../../etc", "id": 1}'], error_status=None),
    "ws-garbage-cursor": Ws(['{"type": "subscribe", "topic": "chats/lobby", "cursor": "nope", "id": 1}'],
                            error_status=None),
    "ws-forged-token": Ws([f'{{"type": "subscribe", "topic": "chats/lobby", "token": "{FORGED}", "id": 1}}'],
                          error_status=401),
    "ws-wrong-topic-token": Ws([f'{{"type": "subscribe", "topic": "chats/lobby", "token": "{OTHER_ROOM}", "id": 1}}'],
                               error_status=403),
    "ws-command-crlf-idempotency-key": Ws([orjson.dumps({
        "type": "command", "id": 1, "method": "POST", "path": SEND, "body": {"author": "a", "text": "x"},
        "headers": {"idempotency-key": "a\r\nSet-Cookie: x=y"}}).decode()], error_status=400),
    "ws-command-unknown-path": Ws(['{"type": "command", "id": 1, "method": "POST", "path": "/../etc", "body": {}}'],
                                  error_status=404),
    "ws-command-deep-body": Ws([orjson.dumps({"type": "command", "id": 1, "method": "POST", "path": SEND,
                                              "body": orjson.loads(deep(100))}).decode()], error_status=422),
    "ws-url-forged-token": Ws([], close_code=4401, query=f"?topic=chats/lobby&token={FORGED}"),
    "ws-non-utf8-text": RawWs(0x1, b'{"type": "ping", "id": "\xff\xfe"}', close_code=1007),
    "ws-reserved-opcode": RawWs(0x3, b"?", close_code=1002),
}


# Running a row -----------------------------------------------------------------------------

def raw_http(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` (it asks for ``Connection: close``) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before reading everything: read what it said
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"no HTTP answer: {answer[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def request_bytes(case: Http, op_id: str) -> bytes:
    """The request line, headers and body of a row (``{op}`` in its path is an operation that exists)."""
    lines = [f"{case.method} {case.path.replace('{op}', op_id)} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in case.headers]
    raw_head = case.raw_head or b""
    framed = b"Transfer-Encoding" in raw_head or b"Content-Length" in raw_head or any(
        n.lower() == "content-length" for n, _ in case.headers)
    if case.body is not None and not framed:
        lines.append(f"Content-Length: {len(case.body)}")
    head = "\r\n".join(lines).encode() + b"\r\n" + (case.raw_head or b"") + b"\r\n"
    return head + (case.body or b"")


def run_http(server: HeraldServer, case: Http, op_id: str) -> None:
    """Send the row; check its status, that it is a problem document, and that nothing was reflected."""
    status, headers, body = raw_http(server.port, request_bytes(case, op_id))
    expected = case.expect if isinstance(case.expect, tuple) else (case.expect,)
    assert status in expected, (status, body[:300])
    assert "injected" not in headers and "set-cookie" not in headers
    if status >= 400 and case.problem:
        assert headers.get("content-type") == PROBLEM, headers
        if headers.get("transfer-encoding") != "chunked":
            doc = orjson.loads(body)
            assert doc["status"] == status and doc["type"] and doc["title"] and "detail" in doc
            assert "Traceback" not in body.decode(errors="replace")


async def run_ws(server: HeraldServer, case: Ws) -> None:
    """Send the row's messages; check the error frame (and that the socket still answers) or the close code."""
    try:
        async with websockets.connect(f"{server.ws_url}/ws{case.query}", max_size=2**20) as ws:
            for message in case.messages:
                await ws.send(message)
            if case.close_code is not None:
                with pytest.raises(websockets.ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
                assert ws.close_code == case.close_code, (ws.close_code, ws.close_reason)
                assert ws.close_reason, "a close code comes with a reason"
                return
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "error", reply
            if case.error_status is not None:
                assert reply["status"] == case.error_status, reply
            await ws.send('{"type": "ping", "id": "still-there"}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong", "id": "still-there"}
    except websockets.InvalidStatus as exc:  # refused at the handshake
        raise AssertionError(f"handshake refused with {exc.response.status_code}") from exc


def run_raw_ws(server: HeraldServer, case: RawWs) -> None:
    """A handshake and one hand-built masked frame; the server must close with the row's code."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        rest = answer.partition(b"\r\n\r\n")[2]
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(case.payload))
        sock.sendall(bytes([0x80 | case.opcode, 0x80 | len(case.payload)]) + mask + masked)
        deadline = time.monotonic() + 5
        while len(rest) < 4 and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    assert rest[0] == 0x88, f"expected a close frame, got {rest[:20]!r}"
    assert struct.unpack("!H", rest[2:4])[0] == case.close_code


def run(session: Session, case: Http | Ws | RawWs) -> None:
    """Run one row of the table."""
    server = session.server
    if isinstance(case, Http):
        run_http(server, case, session.before[0])
    elif isinstance(case, Ws):
        asyncio.run(run_ws(server, case))
    else:
        run_raw_ws(server, case)


# The tests ---------------------------------------------------------------------------------

@dataclass
class Session:
    """The module's server, the operations accepted before the table, and the rows already run."""

    server: HeraldServer
    before: list[str]
    done: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    """One gateway for the whole table, with operations accepted before any row is sent."""
    env = {"HERALD_MAX_WAIT": "1", "HERALD_MAX_WS_MESSAGE": str(MAX_WS)}
    with HeraldServer(env) as server:
        before = []
        for n in range(3):
            response = httpx.post(server.url + SEND, json={"author": "ann", "text": f"before {n}"}, timeout=10)
            assert response.status_code == 202
            before.append(response.json()["id"])
        yield Session(server, before)
        log = server.log()
    assert "unhandled error" not in log, log[-3000:]


def test_the_table_has_at_least_40_rows_over_every_transport() -> None:
    assert len(TABLE) >= 40
    assert sum(isinstance(c, Http) and ("Accept", "text/event-stream") in c.headers for c in TABLE.values()) >= 10
    assert sum(isinstance(c, (Ws, RawWs)) for c in TABLE.values()) >= 10


@pytest.mark.parametrize("name", list(TABLE))
def test_hostile_input_gets_its_4xx_or_close_code(session: Session, name: str) -> None:
    run(session, TABLE[name])
    session.done.add(name)


async def test_after_the_whole_table_the_server_serves_others_and_lost_nothing(session: Session) -> None:
    for name, case in TABLE.items():  # the rows not run yet (when this test runs on its own)
        if name not in session.done:
            await asyncio.to_thread(run, session, case)
    server = session.server
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        for op_id in session.before:
            status = (await client.get(f"/operations/{op_id}", params={"view": "status"})).json()
            assert status["status"] == "succeeded", status
        room = (await client.get("/chats/after")).json()
        async with sse_connect(client, room["subscribe_url"]) as stream:
            await stream.next_block()
            async with websockets.connect(room["websocket_url"]) as ws:
                assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
                done = await client.post("/chats/after/messages", json={"author": "zoe", "text": "still here"},
                                         headers={"Prefer": "wait=1"})
                assert done.status_code in (200, 202)
                message = await stream.next_message()
                assert message.event == "ChatMessageDelivered"
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                assert frame["event"]["data"]["text"] == "still here"
    assert server.process is not None and server.process.poll() is None
