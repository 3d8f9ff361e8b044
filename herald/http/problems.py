"""RFC 9457 problem responses, and the exception that carries one out of a handler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from herald.operations import problem

PROBLEM_BASE = "https://herald.dev/problems/"
PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    411: "Length required",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class HTTPProblem(Exception):
    """Raise anywhere in a handler to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.title = title or _TITLES.get(status, "Error")
        self.headers = dict(headers or {})
        self.extra = extra

    def document(self) -> dict[str, Any]:
        """The problem as a dict."""
        type_ = PROBLEM_BASE + self.kind if self.kind else "about:blank"
        return problem(type_, self.title, self.status, self.detail, **self.extra)


def problem_response(exc: HTTPProblem) -> Response:
    """The ``application/problem+json`` response for ``exc``."""
    return Response(
        orjson.dumps(exc.document()), status_code=exc.status, headers=exc.headers, media_type=PROBLEM_JSON
    )


async def handle_problem(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for :class:`HTTPProblem`."""
    assert isinstance(exc, HTTPProblem)
    return problem_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405/... as problem documents too."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or _TITLES.get(status, "Error")
    headers = getattr(exc, "headers", None) or {}
    return problem_response(HTTPProblem(status, str(detail), headers=headers))
