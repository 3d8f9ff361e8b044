"""The chat domain's declaration: its name, topic rule, event types and the shapes they share."""

from __future__ import annotations

import hashlib
import re

from herald import Domain, HTTPProblem

chat = Domain("chat", title="Herald chat", description="Rooms of messages with delivery and read receipts.")

# Matched in full: with re.match, "$" would also accept a trailing newline (a path's "%0A").
ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
MESSAGE_ID_RE = re.compile(r"m_[A-Za-z0-9_\-]{4,64}")
MAX_TEXT = 2000
MAX_NAME = 64
MESSAGE_TTL = 7 * 86400

# A name has a visible character and no control character (JSON Schema patterns search, so anchor them).
NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME,
        "pattern": "^ *[^\\u0000-\\u0020][^\\u0000-\\u001f]*$"}
MESSAGE = {
    "type": "object",
    "required": ["id", "room", "author", "text", "sent_at", "delivered_at", "read_by"],
    "properties": {
        "id": {"type": "string"}, "room": {"type": "string"}, "author": {"type": "string"},
        "text": {"type": "string"}, "sent_at": {"type": "string"}, "delivered_at": {"type": "string"},
        "read_by": {"type": "array", "items": {"type": "string"}}, "operation_id": {"type": "string"},
    },
}
RECEIPT = {
    "type": "object",
    "required": ["room", "message_id", "reader", "read_at"],
    "properties": {"room": {"type": "string"}, "message_id": {"type": "string"}, "reader": {"type": "string"},
                   "read_at": {"type": "string"}},
}

chat.topic("chats/{room}", subscribe="token", summary="A room's delivered messages and read receipts.")
chat.event("ChatMessageDelivered", schema=MESSAGE, summary="A message was stored and is in the room.",
           topics=["chats/{room}"])
chat.event("ChatMessageRead", schema=RECEIPT, summary="A reader has seen a message.", topics=["chats/{room}"])


def room_topic(room: str) -> str:
    """The topic a room's events go to."""
    return f"chats/{room}"


def message_path(room: str, message_id: str) -> str:
    """The resource path of one message."""
    return f"/chats/{room}/messages/{message_id}"


def message_id_for(operation_id: str) -> str:
    """The message id, derived from the operation so a redelivered request writes the same message."""
    return "m_" + hashlib.sha256(operation_id.encode()).hexdigest()[:20]


def check_room(room: str) -> str:
    """The room name, or a 404 problem (a room that cannot exist is not found)."""
    if not ROOM_RE.fullmatch(room):
        raise HTTPProblem(404, "room names are 1-64 letters, digits, '_' or '-', starting with a letter or digit",
                          kind="no-such-room")
    return room
