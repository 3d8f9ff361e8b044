"""``GET /asyncapi.json``: what a subscriber receives, as AsyncAPI 3.0.

Every topic pattern a domain declares is a channel (``operations/{operation_id}`` is Herald's
own), every event type a message: the domains' response events with the schemas they declared,
and Herald's own ``herald.*`` events (operation status changes, progress, and the stream's
``herald.gap`` and ``herald.disconnect`` notices). Each message's payload is the CloudEvents
envelope, its ``data`` the declared schema. Built once per app, from the same declarations as
``/openapi.json``.
"""

from __future__ import annotations

import re
from typing import Any

from herald.domain import Catalog, EventType
from herald.http.openapi import _public_schema
from herald.operations import STATUS_EVENT_PREFIX, Status
from herald.version import __version__

OPERATION_CHANNEL = "operations"
_NOT_NAME = re.compile(r"[^A-Za-z0-9_]+")
_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")

_STATUS_DATA = {
    "type": "object",
    "required": ["id", "status"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": [s.value for s in Status]},
        "result": {},
        "error": {"type": ["object", "null"]},
        "location": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
    },
}
_CONTROL_DATA = {
    "herald.gap": ("Events were lost between the cursor and the oldest one still kept", {
        "type": "object", "properties": {"topic": {"type": "string"}, "cursor": {"type": ["string", "null"]},
                                         "oldest": {"type": ["string", "null"]}, "detail": {"type": "string"}}}),
    "herald.disconnect": ("The server ends the stream; reconnect with the cursor", {
        "type": "object", "properties": {"reason": {"type": "string"}, "detail": {"type": "string"},
                                         "reconnect": {"type": "boolean"}, "cursor": {"type": ["string", "null"]}}}),
}


def _envelope(data: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["specversion", "id", "source", "type", "time"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string"},
            "source": {"type": "string"},
            "type": {"type": "string"},
            "time": {"type": "string", "format": "date-time"},
            "subject": {"type": ["string", "null"]},
            "datacontenttype": {"type": "string"},
            "correlationid": {"type": "string", "description": "the operation id"},
            "causationid": {"type": "string", "description": "the id of the event that caused this one"},
            "data": _public_schema(data) if data is not None else {},
        },
    }


def _message(name: str, summary: str, data: dict[str, Any] | None) -> dict[str, Any]:
    return {"name": name, "title": name, "summary": summary, "contentType": "application/cloudevents+json",
            "payload": _envelope(data)}


def _channel_id(pattern: str) -> str:
    return _NOT_NAME.sub("_", pattern.replace("{", "").replace("}", "")).strip("_") or "root"


def _message_id(event_type: str) -> str:
    return _NOT_NAME.sub("_", event_type)


def build_asyncapi(catalog: Catalog) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of an app serving ``catalog``'s domains."""
    messages: dict[str, Any] = {}
    status_ids = []
    for status in Status:
        if status is Status.PENDING:
            continue  # an operation starts pending; only moves are published
        event_type = STATUS_EVENT_PREFIX + status.value
        status_ids.append(_message_id(event_type))
        messages[status_ids[-1]] = _message(event_type, f"The operation is now {status.value}", _STATUS_DATA)
    progress = "herald.operation.progress"
    messages[_message_id(progress)] = _message(progress, "A worker's progress report", None)
    control_ids = []
    for event_type, (summary, data) in _CONTROL_DATA.items():
        control_ids.append(_message_id(event_type))
        messages[control_ids[-1]] = _message(event_type, summary + " (SSE; on WebSocket a frame of its own)", data)
    for event in catalog.events.values():
        messages[_message_id(event.type)] = _message(event.type, event.summary, event.schema)

    def refs(ids: list[str]) -> dict[str, Any]:
        return {i: {"$ref": f"#/components/messages/{i}"} for i in ids}

    channels: dict[str, Any] = {
        OPERATION_CHANNEL: {
            "address": "operations/{operation_id}",
            "title": "One operation",
            "description": "Every event of one operation, from its first to its terminal status event "
                           "(GET /operations/{operation_id}/events, or subscribe on /ws).",
            "parameters": {"operation_id": {"description": "the operation id (the correlation id)"}},
            "messages": refs([*status_ids, _message_id(progress), *control_ids,
                              *(_message_id(e.type) for e in catalog.events.values())]),
        }
    }
    for rule in catalog.topics:
        events = [e for e in catalog.events.values() if _goes_to(e, rule.pattern)]
        channels[_channel_id(rule.pattern)] = {
            "address": rule.pattern,
            "title": rule.pattern,
            "description": (rule.summary + " " if rule.summary else "") + f"Subscribe: {rule.subscribe}.",
            "parameters": {name: {} for name in _PARAM.findall(rule.pattern)},
            "messages": refs([*(_message_id(e.type) for e in events), *control_ids]),
        }
    operations = {
        f"receive_{channel_id}": {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in channel["messages"]],
        }
        for channel_id, channel in channels.items()
    }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": " + ".join(d.title for d in catalog.domains) or "Herald", "version": __version__,
                 "description": "Events pushed by Herald over SSE (GET /topics/{topic}/events) and WebSocket (/ws)."},
        "defaultContentType": "application/cloudevents+json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def _goes_to(event: EventType, pattern: str) -> bool:
    return pattern in event.topics or not event.topics
