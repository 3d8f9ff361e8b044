"""The chat domain: Herald's first application, built only on its public API.

Commands: ``POST /chats/{room}/messages`` ``{author, text}`` → ``ChatMessageSent``, and
``POST /chats/{room}/messages/{mid}/read`` ``{reader}`` → ``ChatMessageRead``. Its handlers
answer with ``ChatMessageDelivered`` and ``ChatMessageRead`` on the operation's topic and on
the room's topic ``chats/{room}``. Reads: ``GET /chats/{room}`` (the room's subscribe URLs),
``GET /chats/{room}/messages`` and ``GET /chats/{room}/messages/{mid}``.

Run its worker with ``herald worker app.chat:chat``.
"""

from __future__ import annotations

from app.chat import commands, handlers, reads
from app.chat.domain import chat, message_id_for, message_path, room_topic

__all__ = ["chat", "commands", "handlers", "message_id_for", "message_path", "reads", "room_topic"]
