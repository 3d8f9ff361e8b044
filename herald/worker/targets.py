"""What ``herald worker pkg.mod:target`` runs, found by its import path.

The target is a :class:`~herald.WorkerSettings` subclass (its ``handlers`` and limits, as in arq),
or anything that carries a ``handlers`` mapping of its own: a :class:`~herald.Domain`, or a list of
them. Told apart by that attribute, not by type, so the worker needs nothing of the gateway's
modules. A target that cannot be loaded raises :class:`LoadError`, whose message says why in one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from herald.worker import Handler, WorkerSettings


class LoadError(Exception):
    """A ``module:attribute`` target is missing, unimportable or of the wrong kind."""


def load_object(path: str) -> Any:
    """Import ``module:attribute`` and return the attribute."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise LoadError(f"expected module:attribute, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise LoadError(f"module {module_name!r} has no attribute {attr!r}") from None


def load_worker_spec(path: str) -> type[WorkerSettings]:
    """The settings class at ``path``, or one made from the handlers of the domain (or domains) there."""
    target = load_object(path)
    if isinstance(target, type):
        if isinstance(getattr(target, "handlers", None), Mapping):
            return target
    else:
        parts = list(target) if isinstance(target, list | tuple) else [target]
        if parts and all(isinstance(getattr(p, "handlers", None), Mapping) for p in parts):
            handlers: dict[str, Handler] = {}
            for part in parts:
                for event_type, handler in part.handlers.items():
                    if event_type in handlers:
                        raise LoadError(f"{path}: {event_type} has handlers in two domains")
                    handlers[event_type] = handler
            return type("DomainWorkerSettings", (WorkerSettings,), {"handlers": handlers})
    raise LoadError(f"{path} is neither a herald.Domain nor a settings class with a handlers mapping")
