"""Structured JSON logs: one object per line, with the correlation id when there is one.

The correlation id (an operation id) is set per task with :func:`bind_correlation_id` where
an operation comes into play (a command accepted, an operation read, a worker's delivery), so
every line logged after that in the same task carries it, uvicorn's access line included.

Tokens never reach a log: :class:`RedactTokens` rewrites ``token=…``/``access_token=…`` query
parameters and ``Bearer …`` credentials in every Herald and uvicorn record (the access line
logs the request target, and subscribe URLs carry ``?token=``).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

correlation_id: ContextVar[str | None] = ContextVar("herald_correlation_id", default=None)
"""The operation the current task is working for, if any."""

_SECRET = re.compile(r"(?i)(\b(?:access_)?token=|\bbearer\s+)[^&\s\"'#]+")
REDACTED = "[redacted]"


def bind_correlation_id(value: str | None) -> None:
    """Make ``value`` the correlation id of every log line of this task from now on."""
    correlation_id.set(value)


def redact(text: str) -> str:
    """``text`` with token values and bearer credentials replaced by ``[redacted]``."""
    return _SECRET.sub(lambda m: m.group(1) + REDACTED, text)


class RedactTokens(logging.Filter):
    """Removes tokens from a record's message; on uvicorn's access line also adds structured fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, version, status = args
            safe_path = redact(str(path))
            record.client = client
            record.method = method
            record.path = safe_path
            record.status = status
            record.args = (client, method, safe_path, version, status)
            return True
        message = record.getMessage()
        if "oken=" in message or "earer" in message or "EARER" in message:
            record.msg = redact(message)
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``extra={...}`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                doc[key] = value
        if "correlation_id" not in doc:
            bound = correlation_id.get()
            if bound is not None:
                doc["correlation_id"] = bound
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))  # a traceback may quote a URL
        return orjson.dumps(doc, default=str).decode()


def configure_logging(level: str = "info") -> None:
    """Send Herald's logs, and uvicorn's, to stderr as JSON lines; Herald's at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    redactor = RedactTokens()
    handler.addFilter(redactor)
    root = logging.getLogger("herald")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # uvicorn logs the request target (with ?token=) on its access line and on WebSocket
    # handshakes (uvicorn.error): filters on those loggers run before any handler sees the record.
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, RedactTokens)]
        logger.addFilter(redactor)
    for name in ("uvicorn", "uvicorn.access"):
        logger = logging.getLogger(name)
        if logger.handlers:  # configured by uvicorn (not when the app runs in a test client)
            logger.handlers[:] = [handler]
