"""Admission's counters and the WebSocket's Origin rule, with plain inputs.

The attacks they answer, sent to a real process, are in ``tests/herald/hardening/test_abuse.py``.
"""

from __future__ import annotations

import pytest
from starlette.websockets import WebSocket

from herald.http.admission import Admission, token_key
from herald.http.push import _origin_allowed
from herald.settings import Settings


def test_each_cap_is_named_by_its_limit_reason_and_a_seat_given_back_frees_it() -> None:
    settings = Settings(max_connections=3, max_connections_per_client=2, max_connections_per_token=1)
    admission = Admission()
    token = token_key("a.b.c")
    first = admission.admit("ip:1", token)
    assert admission.refusal(settings, "ip:2", token) == "connections-token"
    assert admission.refusal(settings, "ip:1", None) is None
    second = admission.admit("ip:1", None)
    assert admission.refusal(settings, "ip:1", None) == "connections-client"
    admission.admit("ip:2", None)
    assert admission.refusal(settings, "ip:3", None) == "connections-process"
    admission.release(first)
    admission.release(second)
    assert admission.refusal(settings, "ip:1", token) is None
    assert admission.connections == 1
    assert admission._clients == {"ip:2": 1} and admission._tokens == {}  # nobody gone is remembered


def test_a_token_is_counted_by_a_short_digest_and_no_token_is_not_counted() -> None:
    assert token_key(None) is None and token_key("") is None
    key = token_key("x" * 8192)
    assert key is not None and len(key) == 24
    assert key == token_key("x" * 8192)
    assert key != token_key("x" * 8191)


def test_long_polls_take_a_slot_each_up_to_the_limit() -> None:
    admission = Admission()
    assert admission.begin_long_poll(2) and admission.begin_long_poll(2)
    assert not admission.begin_long_poll(2)
    admission.end_long_poll()
    assert admission.begin_long_poll(2)
    assert not admission.begin_long_poll(0)


def _socket(origin: str | None, host: str, scheme: str = "ws") -> WebSocket:
    headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin is not None else [])
    scope = {"type": "websocket", "scheme": scheme, "path": "/ws", "query_string": b"", "headers": headers,
             "server": ("127.0.0.1", 8000)}
    return WebSocket(scope, receive=None, send=None)  # type: ignore[arg-type]  # only the scope is read


@pytest.mark.parametrize(("origin", "host", "scheme", "allowed"), [
    (None, "chat.example", "wss", True),  # not a browser
    ("https://chat.example", "chat.example", "wss", True),
    ("https://chat.example", "chat.example:443", "wss", True),  # the default port, written or not
    ("HTTPS://Chat.Example", "chat.example", "wss", True),
    ("http://127.0.0.1:8000", "127.0.0.1:8000", "ws", True),
    ("http://[::1]:8000", "[::1]:8000", "ws", True),
    ("http://chat.example", "chat.example", "wss", False),  # an http page on a wss socket is another origin
    ("https://127.0.0.1:8000", "127.0.0.1:8000", "ws", False),
    ("http://127.0.0.1:8001", "127.0.0.1:8000", "ws", False),
    ("http://127.0.0.1.evil.example", "127.0.0.1", "ws", False),
    ("https://evil.example", "chat.example", "wss", False),
    ("null", "chat.example", "wss", False),
    ("https://chat.example:not-a-port", "chat.example", "wss", False),
    ("https://app.example", "chat.example", "wss", True),  # listed in HERALD_CORS_ORIGINS
    ("https://www.chat.example", "10.0.0.5:8000", "ws", True),  # HERALD_PUBLIC_URL's, behind a proxy
])
def test_a_websocket_origin_is_the_gateways_own_or_a_listed_one(origin: str | None, host: str, scheme: str,
                                                                allowed: bool) -> None:
    settings = Settings(cors_origins=("https://App.example",), public_url="https://www.chat.example/herald")
    assert _origin_allowed(_socket(origin, host, scheme), settings) is allowed
