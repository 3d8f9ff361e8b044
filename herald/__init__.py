"""Herald: a real-time push gateway for asynchronous operations.

The public API, what an application codes against (see docs/domains.md)::

    from herald import Domain, Context, Failed, Retry, Settings, create_app

Everything else in the package is Herald's own and may change between releases.
"""

from __future__ import annotations

from herald.app import create_app
from herald.domain import CommandInput, Domain, DomainError
from herald.events import Event, now_iso
from herald.http.gateway import Gateway
from herald.http.problems import HTTPProblem
from herald.schema import SchemaError
from herald.settings import Settings, SettingsError
from herald.version import __version__
from herald.worker import Context, Failed, Retry, Worker, WorkerSettings

__all__ = [
    "CommandInput",
    "Context",
    "Domain",
    "DomainError",
    "Event",
    "Failed",
    "Gateway",
    "HTTPProblem",
    "Retry",
    "SchemaError",
    "Settings",
    "SettingsError",
    "Worker",
    "WorkerSettings",
    "__version__",
    "create_app",
    "now_iso",
]
