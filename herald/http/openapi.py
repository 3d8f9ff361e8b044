"""``GET /openapi.json``: the HTTP API as OpenAPI 3.1: Herald's own endpoints and every domain's commands and reads."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from herald.domain import Catalog, Command
from herald.version import __version__

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
        "operationId": f"{command.method.lower()}_{command.event_type}",
        "parameters": [
            *_path_params(command.path),
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}},
            {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _public_schema(command.schema or {"type": "object"})}},
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


_CLOUDEVENT = {
    "type": "object",
    "required": ["type"],
    "description": "A CloudEvents 1.0 JSON event; specversion, id, time and source are filled in when missing, "
                   "other lowercase attributes are kept as extensions",
    "properties": {"specversion": {"const": "1.0"}, "id": {"type": "string"}, "source": {"type": "string"},
                   "type": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_.\\-]{0,127}$"},
                   "time": {"type": "string", "format": "date-time"}, "subject": {"type": "string"},
                   "datacontenttype": {"const": "application/json"}, "data": {}},
}


def _publish_op() -> dict[str, Any]:
    """``POST /topics/{topic}/events``: the publish API (herald/http/publish.py)."""
    body = {"oneOf": [_CLOUDEVENT, {"type": "array", "minItems": 1, "items": _CLOUDEVENT}]}
    return {
        "summary": "Publish one CloudEvent, or a batch, to a topic (server to server)",
        "description": "Needs a bearer JWT whose herald.publish claim lists topic patterns that open the topic. "
                       "The events are stored in the topic's history and pushed to its subscribers.",
        "operationId": "publish_events",
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "topic", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "the topic; its slashes are kept (/topics/orders/42/events)"},
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}},
        ],
        "requestBody": {"required": True, "content": {
            media: {"schema": body} for media in ("application/json", "application/cloudevents+json",
                                                  "application/cloudevents-batch+json")}},
        "responses": {
            "200": {"description": "Stored and pushed: each event's id and cursor, in order",
                    "headers": {"Idempotent-Replayed": _HEADER},
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["events"],
                        "properties": {"events": {"type": "array", "items": {
                            "type": "object", "required": ["id", "cursor"],
                            "properties": {"id": {"type": "string"}, "cursor": {"type": "string"}}}}}}}}},
            "400": _problem("Malformed JSON, topic or Idempotency-Key"),
            "401": _problem("Missing or invalid publisher token, or no publisher key configured"),
            "403": _problem("The token's herald.publish claim does not open the topic, or the topic is reserved"),
            "404": _problem("No such route: a topic that cannot be in a path"),
            "409": _problem("The same Idempotency-Key is still being published"),
            "413": _problem("Body too large (HERALD_PUBLISH_MAX_BODY)"),
            "415": _problem("Not JSON"),
            "422": _problem("An invalid or too large event (its index is named), a batch too large, or "
                            "Idempotency-Key reused with another body"),
            "429": _problem("Over HERALD_PUBLISH_RATE events per second for this publisher"),
            "503": _problem("Broker unavailable"),
        },
    }


def _public_schema(schema: Any) -> Any:
    """``schema`` without Herald's ``x-problem`` keyword (kept out of the published document)."""
    if isinstance(schema, dict):
        return {k: _public_schema(v) for k, v in schema.items() if k != "x-problem"}
    if isinstance(schema, list):
        return [_public_schema(v) for v in schema]
    return schema


def _read_op(route: Route, method: str) -> dict[str, Any]:
    doc = (getattr(route.endpoint, "__doc__", None) or "").strip()
    return {
        "summary": doc.splitlines()[0] if doc else route.path,
        "operationId": f"{method.lower()}_{getattr(route.endpoint, '__name__', route.path)}",
        "parameters": _path_params(route.path),
        "responses": {"200": {"description": "OK", "content": _JSON_OBJECT},
                      "401": _problem("Missing or invalid bearer token (when authentication is on)"),
                      "404": _problem("Not found"),
                      "503": _problem("Broker unavailable")},
    }


def build_openapi(catalog: Catalog) -> dict[str, Any]:
    """The OpenAPI document of an app serving ``catalog``'s domains."""
    paths: dict[str, Any] = {}
    for command in catalog.commands:
        paths.setdefault(command.path, {})[command.method.lower()] = _command_op(command)
    for domain in catalog.domains:
        for route in domain.routes:
            if isinstance(route, Route):
                for method in sorted((route.methods or set()) - {"HEAD"}):
                    paths.setdefault(route.path, {})[method.lower()] = _read_op(route, method)
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
            "summary": "One topic as SSE (its name keeps its slashes, e.g. /topics/orders/42/events)",
            "operationId": "topic_events",
            "parameters": [{"name": "topic", "in": "path", "required": True, "schema": {"type": "string"}},
                           token, resume],
            "responses": {"200": {"description": "Event stream", "content": stream}, **sse_errors},
        }
    }
    paths["/topics/{topic}/events"]["post"] = _publish_op()
    for path, summary in (("/healthz", "The process is alive"), ("/readyz", "The broker is reachable")):
        paths[path] = {"get": {"summary": summary, "operationId": path.strip("/"),
                               "responses": {"200": {"description": "OK"}, "503": _problem("Not ready")}}}
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
        "info": {"title": " + ".join(d.title for d in catalog.domains) or "Herald", "version": __version__,
                 "description": "Served by Herald, a real-time push gateway for asynchronous operations."},
        "paths": paths,
        "x-domains": [{"name": d.name, "title": d.title, "description": d.description} for d in catalog.domains],
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
