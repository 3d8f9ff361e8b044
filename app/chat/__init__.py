"""The chat domain: Herald's shipped example, built only on its public pieces.

Commands: ``POST /chats/{room}/messages`` ``{author, text}`` → ``ChatMessageSent``, and
``POST /chats/{room}/messages/{mid}/read`` ``{reader}`` → ``ChatMessageRead``. The chat
worker (:mod:`app.chat.worker`) answers with ``ChatMessageDelivered`` and ``ChatMessageRead``
on the operation's topic and on the room's topic ``chats/{room}``. Reads:
``GET /chats/{room}`` (the room's subscribe URLs), ``GET /chats/{room}/messages`` and
``GET /chats/{room}/messages/{mid}``.
"""

from __future__ import annotations

import re
from typing import Any

from app.http.commands import Command, CommandInput
from app.http.problems import HTTPProblem

# Matched in full: with re.match, "$" would also accept a trailing newline (a path's "%0A").
ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
MESSAGE_ID_RE = re.compile(r"m_[A-Za-z0-9_\-]{4,64}")
MAX_TEXT = 2000
MAX_NAME = 64


def room_topic(room: str) -> str:
    """The topic a room's events go to."""
    return f"chats/{room}"


def message_path(room: str, message_id: str) -> str:
    """The resource path of one message."""
    return f"/chats/{room}/messages/{message_id}"


def check_room(room: str) -> str:
    """The room name, or a 404 problem (a room that cannot exist is not found)."""
    if not ROOM_RE.fullmatch(room):
        raise HTTPProblem(404, "room names are 1-64 letters, digits, '_' or '-', starting with a letter or digit",
                          kind="no-such-room")
    return room


def _name(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise HTTPProblem(422, f"'{field}' is required: a non-empty string", kind="invalid-command", field=field)
    value = value.strip()
    if len(value) > MAX_NAME or any(ord(c) < 32 for c in value):
        raise HTTPProblem(422, f"'{field}' must be at most {MAX_NAME} printable characters",
                          kind="invalid-command", field=field)
    return value


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPProblem(422, "the body must be a JSON object", kind="invalid-command")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPProblem(422, f"unknown field {unknown[0]!r}; expected {sorted(allowed)}", kind="invalid-command",
                          field=unknown[0])
    return body


def parse_send(params: dict[str, str], body: Any) -> CommandInput:
    """Validate a message to send."""
    room = check_room(params["room"])
    body = _object(body, {"author", "text"})
    author = _name(body, "author")
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HTTPProblem(422, "'text' is required: a non-empty string", kind="invalid-command", field="text")
    if len(text) > MAX_TEXT:
        raise HTTPProblem(422, f"'text' is longer than {MAX_TEXT} characters", kind="message-too-long",
                          title="Message too long", field="text", max_length=MAX_TEXT)
    return CommandInput({"room": room, "author": author, "text": text}, subject=room_topic(room))


def parse_read(params: dict[str, str], body: Any) -> CommandInput:
    """Validate a read receipt."""
    room = check_room(params["room"])
    message_id = params["message_id"]
    if not MESSAGE_ID_RE.fullmatch(message_id):
        raise HTTPProblem(404, "no such message", kind="no-such-message")
    body = _object(body, {"reader"})
    reader = _name(body, "reader")
    return CommandInput({"room": room, "message_id": message_id, "reader": reader}, subject=room_topic(room))


SEND_SCHEMA = {
    "type": "object",
    "required": ["author", "text"],
    "additionalProperties": False,
    "properties": {
        "author": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
        "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
    },
}
READ_SCHEMA = {
    "type": "object",
    "required": ["reader"],
    "additionalProperties": False,
    "properties": {"reader": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
}

COMMANDS = [
    Command("/chats/{room}/messages", "ChatMessageSent", parse_send, "Send a message to a room.", SEND_SCHEMA),
    Command("/chats/{room}/messages/{message_id}/read", "ChatMessageRead", parse_read,
            "Report that a reader has seen a message.", READ_SCHEMA),
]
