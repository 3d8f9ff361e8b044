"""``GET /openapi.json``: the HTTP API as OpenAPI 3.1, built from the registered commands."""

from __future__ import annotations

from typing import Any

from app.http.commands import Command

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_OPERATION = {"$ref": "#/components/schemas/Operation"}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM}}}


_OPERATION_ID = {"type": "string", "pattern": "^op_[A-Za-z0-9_-]{1,61}$"}
_HEADER = {"schema": {"type": "string"}}


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def _command_op(command: Command) -> dict[str, Any]:
    op_body = {"application/json": {"schema": _OPERATION}}
    return {
        "summary": command.summary,
        "operationId": f"post_{command.event_type}",
        "parameters": [
            *_path_params(command.path),
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}},
            {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": command.body_schema or {"type": "object"}}},
        },
        "responses": {
            "202": {"description": "Accepted: follow the operation", "content": op_body,
                    "headers": {"Location": {**_HEADER, "required": True},
                                "Retry-After": {**_HEADER, "required": True}}},
            "200": {"description": "Finished within Prefer: wait", "content": op_body},
            "400": _problem("Malformed JSON or header"),
            "401": _problem("Missing or invalid bearer token"),
            "404": _problem("No such resource"),
            "413": _problem("Body too large"),
            "415": _problem("Not JSON"),
            "422": _problem("Invalid command, or Idempotency-Key reused with another body"),
            "429": _problem("Too many commands"),
            "503": _problem("Broker unavailable or shutting down"),
        },
    }


def build_openapi(commands: list[Command]) -> dict[str, Any]:
    """The OpenAPI document."""
    paths: dict[str, Any] = {}
    for command in commands:
        paths.setdefault(command.path, {})["post"] = _command_op(command)
    op_param = [{"name": "operation_id", "in": "path", "required": True, "schema": _OPERATION_ID}]
    stream = {"text/event-stream": {"schema": {"type": "string"}}}
    paths["/operations/{operation_id}"] = {
        "get": {
            "summary": "Poll an operation (303 to the created resource once it succeeded, unless ?view=status)",
            "operationId": "get_operation",
            "parameters": [
                *op_param,
                {"name": "wait", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0}},
                {"name": "view", "in": "query", "required": False, "schema": {"type": "string", "enum": ["status"]}},
            ],
            "responses": {
                "200": {"description": "The operation", "content": {"application/json": {"schema": _OPERATION}}},
                "303": {"description": "Succeeded: see the created resource",
                        "headers": {"Location": {**_HEADER, "required": True}}},
                "304": {"description": "Not modified (If-None-Match)"},
                "400": _problem("Bad query"),
                "401": _problem("Missing or invalid bearer token (when authentication is on)"),
                "404": _problem("Unknown, expired, or another subject's"),
                "503": _problem("Broker unavailable"),
            },
        },
        "delete": {
            "summary": "Ask to cancel an operation",
            "operationId": "cancel_operation",
            "parameters": op_param,
            "responses": {
                "202": {"description": "Cancel requested", "content": {"application/json": {"schema": _OPERATION}}},
                "401": _problem("Missing or invalid bearer token (when authentication is on)"),
                "404": _problem("Unknown, expired, or another subject's"),
                "409": _problem("Already ended"),
                "503": _problem("Broker unavailable"),
            },
        },
    }
    token = {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}
    resume = {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string"}}
    sse_errors = {
        "400": _problem("Bad topic or cursor"),
        "401": _problem("Missing or invalid token"),
        "403": _problem("Token does not open the topic"),
        "404": _problem("Unknown operation"),
        "503": _problem("Broker unavailable or too many connections"),
    }
    paths["/operations/{operation_id}/events"] = {
        "get": {
            "summary": "The operation's events as SSE, from its first to its terminal one",
            "operationId": "operation_events",
            "parameters": [*op_param, token, resume],
            "responses": {"200": {"description": "Event stream", "content": stream}, **sse_errors},
        }
    }
    paths["/topics/events"] = {
        "get": {
            "summary": "Several topics on one SSE stream",
            "operationId": "topics_events",
            "parameters": [
                {"name": "topic", "in": "query", "required": True,
                 "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True},
                token,
                resume,
            ],
            "responses": {"200": {"description": "Event stream", "content": stream}, **sse_errors},
        }
    }
    paths["/topics/{topic}/events"] = {
        "get": {
            "summary": "One topic as SSE (its name keeps its slashes, e.g. /topics/chats/lobby/events)",
            "operationId": "topic_events",
            "parameters": [{"name": "topic", "in": "path", "required": True, "schema": {"type": "string"}},
                           token, resume],
            "responses": {"200": {"description": "Event stream", "content": stream}, **sse_errors},
        }
    }
    for path, summary in (("/healthz", "The process is alive"), ("/readyz", "The broker is reachable")):
        paths[path] = {"get": {"summary": summary, "operationId": path.strip("/"),
                               "responses": {"200": {"description": "OK"}, "503": _problem("Not ready")}}}
    paths["/chats/{room}"] = {"get": {
        "summary": "A room's URLs and subscribe token", "operationId": "get_room",
        "parameters": _path_params("/chats/{room}"),
        "responses": {"200": {"description": "The room", "content": _JSON_OBJECT},
                      "401": _problem("Missing or invalid bearer token (when authentication is on)"),
                      "404": _problem("Invalid room name")},
    }}
    paths["/chats/{room}/messages"]["get"] = {
        "summary": "Recent messages", "operationId": "list_messages",
        "parameters": [*_path_params("/chats/{room}"),
                       {"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
        "responses": {"200": {"description": "Messages", "content": _JSON_OBJECT},
                      "400": _problem("Bad limit"), "404": _problem("Invalid room name"),
                      "401": _problem("Missing or invalid bearer token (when authentication is on)"),
                      "503": _problem("Broker unavailable")},
    }
    paths["/chats/{room}/messages/{message_id}"] = {"get": {
        "summary": "One message", "operationId": "get_message",
        "parameters": _path_params("/chats/{room}/messages/{message_id}"),
        "responses": {"200": {"description": "The message", "content": _JSON_OBJECT},
                      "401": _problem("Missing or invalid bearer token (when authentication is on)"),
                      "404": _problem("No such message"), "503": _problem("Broker unavailable")},
    }}
    paths["/metrics"] = {"get": {
        "summary": "Prometheus metrics of this process", "operationId": "metrics",
        "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {
            "type": "string"}}}}},
    }}
    paths["/session/cookie"] = {
        "post": {
            "summary": "Keep a subscribe token as the HttpOnly cookie herald_token (for EventSource)",
            "operationId": "set_token_cookie",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["token"], "additionalProperties": False,
                "properties": {"token": {"type": "string"}}}}}},
            "responses": {
                "200": {"description": "Cookie set; the topics it opens", "content": _JSON_OBJECT,
                        "headers": {"Set-Cookie": {**_HEADER, "required": True}}},
                "400": _problem("Malformed JSON"),
                "401": _problem("Forged or expired token"),
                "403": _problem("Token issued to another subject"),
                "413": _problem("Body too large"),
                "415": _problem("Not JSON"),
                "422": _problem("Not {token}"),
            },
        },
        "delete": {
            "summary": "Clear the herald_token cookie", "operationId": "clear_token_cookie",
            "responses": {"204": {"description": "Cleared"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Herald", "version": "0.1.0",
                 "description": "Real-time push gateway for asynchronous operations."},
        "paths": paths,
        # bearer JWTs are optional: required only when HERALD_JWT_SECRET or HERALD_JWT_PUBLIC_KEY is set
        "security": [{}, {"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
                       "schemas": {
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status"],
                "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                               "status": {"type": "integer"}, "detail": {"type": "string"}},
            },
            "Operation": {
                "type": "object",
                "required": ["id", "type", "status", "created_at", "updated_at", "operation_url", "subscribe_url",
                             "websocket_url", "events_url"],
                "properties": {
                    "id": {"type": "string"},
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["pending", "running", "succeeded", "failed", "canceled"]},
                    "created_at": {"type": "string"},
                    "updated_at": {"type": "string"},
                    "operation_url": {"type": "string"},
                    "subscribe_url": {"type": "string"},
                    "websocket_url": {"type": "string"},
                    "events_url": {"type": "string"},
                    "location": {"type": "string"},
                    "result": {},
                    "error": {"type": ["object", "null"]},
                },
            },
        }},
    }
