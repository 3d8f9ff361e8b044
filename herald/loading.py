"""Loading what the ``herald`` command is pointed at: ``module:attribute`` targets.

``herald serve --domain pkg.mod:orders``, ``herald serve --app pkg.mod:create_app`` and ``herald
worker pkg.mod:orders`` name an object by its import path. A target that cannot be loaded raises
:class:`LoadError`, whose message says what is wrong in one line (the command prints it and exits 2).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from herald.domain import Domain
from herald.settings import Settings
from herald.worker import WorkerSettings


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


def load_domains(path: str) -> list[Domain]:
    """The :class:`Domain` at ``path``, or the list (or tuple) of domains there."""
    target = load_object(path)
    domains = [target] if isinstance(target, Domain) else target if isinstance(target, list | tuple) else None
    if not domains or not all(isinstance(d, Domain) for d in domains):
        raise LoadError(f"{path} is not a herald.Domain (nor a list of them)")
    return list(domains)


def load_worker_spec(path: str) -> type[WorkerSettings]:
    """The settings class at ``path``, or one made from the :class:`Domain` (or list of them) there."""
    target = load_object(path)
    domains = [target] if isinstance(target, Domain) else target if isinstance(target, list | tuple) else None
    if domains is not None and all(isinstance(d, Domain) for d in domains):
        handlers = {t: h for d in domains for t, h in d.handlers.items()}
        return type("DomainWorkerSettings", (WorkerSettings,), {"handlers": handlers})
    if isinstance(target, type) and isinstance(getattr(target, "handlers", None), dict):
        return target
    raise LoadError(f"{path} is neither a herald.Domain nor a settings class with a handlers mapping")


def is_factory(target: Callable[..., Any]) -> bool:
    """Whether ``target`` is an app factory (every parameter has a default) rather than an ASGI app.

    An ASGI app takes ``scope, receive, send``; a factory can be called with nothing.
    """
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: not a factory of ours
        return False
    required = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY)
    return not any(p.default is p.empty and p.kind in required for p in signature.parameters.values())


def takes_settings(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` has a ``settings`` parameter (``app.main:create_app(settings=None)`` has)."""
    try:
        return "settings" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def load_app(path: str, settings: Settings, *, settings_required: bool = False) -> Callable[..., Any]:
    """The ASGI app at ``path``: the object itself, or what the factory there returns.

    A factory with a ``settings`` parameter is called with ``settings`` (so the command's own
    settings, ``--redis-url`` included, are the app's); any other factory is called with nothing.
    ``settings_required``: raise :class:`LoadError` when ``settings`` cannot reach the app.
    """
    target = load_object(path)
    if isinstance(target, Domain):
        raise LoadError(f"{path} is a herald.Domain: use --domain {path}")
    if not callable(target):
        raise LoadError(f"{path} is neither an ASGI app nor a factory of one")
    if not is_factory(target):
        if settings_required:
            raise LoadError(f"{path} is an app built already; settings given on the command line cannot reach it")
        return target
    if takes_settings(target):
        app = target(settings=settings)
    elif settings_required:
        raise LoadError(f"{path} takes no settings parameter; settings given on the command line cannot reach it")
    else:
        app = target()
    if not callable(app):
        raise LoadError(f"{path} returned {type(app).__name__}, not an ASGI app")
    return app
