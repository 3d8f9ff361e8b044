"""The chat's read side: a room's URLs, its recent messages, one message."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.chat.domain import chat, check_room, message_path, room_topic
from herald import Gateway, HTTPProblem

RECENT = 50


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-cache"})


@chat.route("GET", "/chats/{room}")
async def get_room(request: Request) -> Response:
    """The room's URLs: its messages and where to subscribe to it (with a token for its topic)."""
    gateway = Gateway.of(request)
    room = check_room(request.path_params["room"])
    topic = room_topic(room)
    body = {"room": room, "topic": topic, "messages_url": f"{gateway.base_url(request)}/chats/{room}/messages"}
    body.update(gateway.topic_urls(request, [topic], subject=request.scope.get("herald.subject")))
    return _json(body)


@chat.route("GET", "/chats/{room}/messages")
async def list_messages(request: Request) -> Response:
    """The room's recent messages (oldest first) with their read receipts, and the cursor they reach."""
    gateway = Gateway.of(request)
    room = check_room(request.path_params["room"])
    try:
        limit = int(request.query_params.get("limit", RECENT))
    except ValueError as exc:
        raise HTTPProblem(400, "?limit= must be an integer", kind="bad-limit") from exc
    if not 1 <= limit <= 500:
        raise HTTPProblem(400, "?limit= must be between 1 and 500", kind="bad-limit")
    stored = await gateway.tail(room_topic(room), limit * 4)
    messages: dict[str, dict[str, Any]] = {}
    for item in stored:
        data = item.event.data
        if item.event.type == "ChatMessageDelivered" and isinstance(data, dict):
            messages[data["id"]] = {**data, "read_by": list(data.get("read_by", []))}
        elif item.event.type == "ChatMessageRead" and isinstance(data, dict):
            message = messages.get(data.get("message_id", ""))
            if message is not None and data["reader"] not in message["read_by"]:
                message["read_by"].append(data["reader"])
    items = list(messages.values())[-limit:]
    return _json({"room": room, "messages": items, "cursor": stored[-1].cursor if stored else None})


@chat.route("GET", "/chats/{room}/messages/{message_id}")
async def get_message(request: Request) -> Response:
    """One message, as the chat worker stored it (the target of a send operation's 303)."""
    gateway = Gateway.of(request)
    room = check_room(request.path_params["room"])
    path = message_path(room, request.path_params["message_id"])
    message = await gateway.resource(path)
    if message is None:
        raise HTTPProblem(404, f"no message at {path}", kind="no-such-message")
    return _json(message)
