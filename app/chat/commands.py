"""The chat's commands: send a message, report a message read."""

from __future__ import annotations

from typing import Any

from app.chat.domain import MAX_TEXT, MESSAGE_ID_RE, NAME, chat, check_room
from herald import HTTPProblem

SEND_SCHEMA = {
    "type": "object",
    "required": ["author", "text"],
    "additionalProperties": False,
    "properties": {
        "author": NAME,
        "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "pattern": "\\S",
                 "x-problem": {"maxLength": {"kind": "message-too-long", "title": "Message too long"}}},
    },
}
READ_SCHEMA = {
    "type": "object",
    "required": ["reader"],
    "additionalProperties": False,
    "properties": {"reader": NAME},
}


@chat.command("POST", "/chats/{room}/messages", event="ChatMessageSent", schema=SEND_SCHEMA,
              subject="chats/{room}")
def send(params: dict[str, str], body: dict[str, Any], *, caller: str | None = None) -> dict[str, Any]:
    """Send a message to a room (with authentication on, the author is the caller, whatever the body says)."""
    author = caller if caller is not None else body["author"].strip()
    return {"room": check_room(params["room"]), "author": author, "text": body["text"]}


@chat.command("POST", "/chats/{room}/messages/{message_id}/read", event="ChatMessageRead", schema=READ_SCHEMA,
              subject="chats/{room}")
def read(params: dict[str, str], body: dict[str, Any], *, caller: str | None = None) -> dict[str, Any]:
    """Report that a reader has seen a message (with authentication on, the reader is the caller)."""
    room = check_room(params["room"])
    if not MESSAGE_ID_RE.fullmatch(params["message_id"]):
        raise HTTPProblem(404, "no such message", kind="no-such-message")
    reader = caller if caller is not None else body["reader"].strip()
    return {"room": room, "message_id": params["message_id"], "reader": reader}
