"""JSON Schema validation of command bodies: the one source of a command's validation.

A domain declares each command's body as a JSON Schema; :func:`compile_schema` turns it into a
validator once, at declaration (fastjsonschema generates Python code for it, so validating a
body costs a few microseconds, not the tree walk of a generic validator). A body that fails
raises :class:`SchemaViolation` naming the failing field, which the HTTP layer answers as a
``422`` problem. A schema may give a property's rule its own problem with the ``x-problem``
keyword (``{"maxLength": {"kind": …, "title": …}}``), e.g. the chat's ``message-too-long``; validators ignore unknown
keywords, so the schema stays a plain JSON Schema for OpenAPI and AsyncAPI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fastjsonschema
import jsonschema_rs

Validator = Callable[[Any], Any]

_LIMITS = {"maxLength": "max_length", "minLength": "min_length", "maximum": "maximum", "minimum": "minimum",
           "maxItems": "max_items", "minItems": "min_items"}


class SchemaError(ValueError):
    """A schema that is not a valid JSON Schema (raised at declaration, never per request)."""


class SchemaViolation(ValueError):
    """A body that does not match its schema: ``field`` (dotted path, or ``None`` for the body) and why."""

    def __init__(self, detail: str, *, field: str | None, rule: str, extra: dict[str, Any]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.rule = rule
        self.extra = extra
        """Problem members the schema adds: ``kind``/``title`` from ``x-problem``, the limit that failed."""


def compile_schema(schema: dict[str, Any]) -> Validator:
    """A validator for ``schema``; :class:`SchemaError` if the schema itself is invalid."""
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        raise SchemaError(f"invalid JSON Schema: {exc.message}") from exc
    try:
        validate = fastjsonschema.compile(schema)
    except Exception as exc:  # a definition error, or a pattern that is not a regex (re.error), …
        raise SchemaError(f"invalid JSON Schema: {exc}") from exc

    def check(body: Any) -> Any:
        try:
            return validate(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise _violation(exc) from None

    return check


def _violation(exc: fastjsonschema.JsonSchemaValueException) -> SchemaViolation:
    path = [str(p) for p in (exc.path or [])][1:]  # the first element is the root, "data"
    definition = exc.definition if isinstance(exc.definition, dict) else {}
    value = exc.value
    rule = exc.rule or "invalid"
    field = ".".join(path) or None
    extra: dict[str, Any] = {}
    if rule == "required" and isinstance(value, dict):
        missing = [name for name in definition.get("required", []) if name not in value]
        if missing:
            field = ".".join([*path, missing[0]])
            return SchemaViolation(f"'{field}' is required", field=field, rule=rule, extra=extra)
    if rule == "additionalProperties" and isinstance(value, dict):
        known = set(definition.get("properties", {}))
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            field = ".".join([*path, unknown[0]])
            return SchemaViolation(f"unknown field '{field}'; expected {sorted(known)}", field=field, rule=rule,
                                   extra=extra)
    if rule in _LIMITS and rule in definition:
        extra[_LIMITS[rule]] = definition[rule]
    custom = definition.get("x-problem")
    if isinstance(custom, dict) and isinstance(custom.get(rule), dict):
        extra.update({k: v for k, v in custom[rule].items() if k in ("kind", "title")})
    return SchemaViolation(_detail(exc.message, field, rule, definition), field=field, rule=rule, extra=extra)


def _detail(message: str, field: str | None, rule: str, definition: dict[str, Any]) -> str:
    """A sentence a client can act on; fastjsonschema's own for the rules not worded here."""
    name = f"'{field}'" if field else "the body"
    limit = definition.get(rule)
    if rule == "maxLength":
        return f"{name} is longer than {limit} characters"
    if rule == "minLength":
        return f"{name} must not be empty" if limit == 1 else f"{name} is shorter than {limit} characters"
    if rule == "pattern":
        return f"{name} does not have the required form (pattern {limit})"
    if rule == "type":
        return f"{name} must be of type {limit}"
    return name + message.removeprefix("data." + field if field else "data")
