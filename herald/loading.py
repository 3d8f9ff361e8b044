"""Loading what the ``herald`` command is pointed at: ``module:attribute`` targets.

``herald serve --domain pkg.mod:orders`` and ``herald serve --app pkg.mod:create_app`` name an
object by its import path (the worker's targets are :mod:`herald.worker.targets`, which this builds
on). A target that cannot be loaded raises :class:`LoadError`, whose message says what is wrong in
one line (the command prints it and exits 2).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from herald.domain import Domain
from herald.settings import Settings
from herald.worker.targets import LoadError, load_object

__all__ = ["LoadError", "is_factory", "load_app", "load_domains", "load_object", "takes_settings"]


def load_domains(path: str) -> list[Domain]:
    """The :class:`Domain` at ``path``, or the list (or tuple) of domains there."""
    target = load_object(path)
    domains = [target] if isinstance(target, Domain) else target if isinstance(target, list | tuple) else None
    if not domains or not all(isinstance(d, Domain) for d in domains):
        raise LoadError(f"{path} is not a herald.Domain (nor a list of them)")
    return list(domains)


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
