"""``Domain``: one application's commands, read routes, handlers, topic rules and event types.

A domain is what a team writes to put Herald in front of its own work::

    orders = Domain("orders")

    @orders.command("POST", "/orders", event="OrderPlaced", schema=ORDER_SCHEMA)
    def place(params: dict, body: dict) -> dict:
        return {"item": body["item"], "qty": body["qty"]}

    @orders.handler("OrderPlaced")
    async def confirm(ctx: Context) -> None:
        ...

A command can also be forwarded to an upstream HTTP service instead of a Python handler
(``orders.proxy("POST", "/orders", event="OrderPlaced", upstream="http://orders:9000/orders")``,
see :mod:`herald.proxy`), and a read route answered by one (``orders.proxy_route``).

``create_app(settings, domains=[orders])`` serves its commands and read routes; ``herald worker
mypkg.orders:orders`` (or the embedded worker) runs its handlers. The command schema is the one
source of validation, of ``/openapi.json`` and of ``/asyncapi.json``. Declaring is pure: nothing
here does I/O, and every mistake (a bad schema, a route declared twice) is raised at import.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.routing import BaseRoute, Route

from herald.proxy.spec import Backoff, ProxyCommand, ProxyRoute, ProxySpecError
from herald.schema import Validator, compile_schema
from herald.worker import Handler

SubscribeRule = Literal["anyone", "token", "owner"]
SUBSCRIBE_RULES: tuple[str, ...] = ("anyone", "token", "owner")
COMMAND_METHODS = ("POST", "PUT", "PATCH", "DELETE")
_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?}")
_EVENT_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,127}")


class DomainError(ValueError):
    """A declaration that cannot work (raised when the domain is declared or combined, never per request)."""


@dataclass(frozen=True, slots=True)
class CommandInput:
    """What a command function may return instead of plain data: the event's data and its subject."""

    data: Any
    subject: str | None = None


CommandFunction = Callable[..., Any]
"""``(path parameters, validated body[, *, caller]) -> request event data`` (or a :class:`CommandInput`)."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command route: ``method path`` becomes a request event of ``event_type``."""

    method: str
    path: str
    event_type: str
    build: CommandFunction
    summary: str = ""
    schema: dict[str, Any] | None = None
    subject: str | None = None
    """A template of the request event's subject, filled from the path parameters (e.g. ``orders/{id}``)."""
    validate: Validator | None = None
    takes_caller: bool = False
    """Whether ``build`` has a ``caller`` keyword: the authenticated subject (``None`` in anonymous mode)."""

    def parse(self, params: dict[str, str], body: Any, *, caller: str | None = None) -> CommandInput:
        """Validate ``body`` (:class:`~herald.schema.SchemaViolation`) and build the request event's data."""
        if self.validate is not None:
            self.validate(body)
        out = self.build(params, body, caller=caller) if self.takes_caller else self.build(params, body)
        if isinstance(out, CommandInput):
            return out
        return CommandInput(out, self.subject.format(**params) if self.subject else None)


@dataclass(frozen=True, slots=True)
class TopicRule:
    """Who may subscribe to the topics matching ``pattern`` (``orders/{id}``; ``{name}`` is one segment)."""

    pattern: str
    subscribe: SubscribeRule = "token"
    summary: str = ""
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.subscribe not in SUBSCRIBE_RULES:
            raise DomainError(f"topic {self.pattern!r}: subscribe must be one of {SUBSCRIBE_RULES}")
        if self.pattern.startswith("operations/"):
            raise DomainError(f"topic {self.pattern!r}: operations/… topics are Herald's own (open to their owner)")
        parts = _PARAM.split(self.pattern)
        # split() alternates literal text and parameter names
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
        object.__setattr__(self, "regex", re.compile(regex))

    def match(self, topic: str) -> dict[str, str] | None:
        """The pattern's parameters if ``topic`` matches it, else ``None``."""
        found = self.regex.fullmatch(topic)
        return found.groupdict() if found else None


@dataclass(frozen=True, slots=True)
class EventType:
    """An event type a domain publishes: its schema and the topics it goes to (for ``/asyncapi.json``)."""

    type: str
    schema: dict[str, Any] | None = None
    summary: str = ""
    topics: tuple[str, ...] = ()


class Domain:
    """A domain's commands, read routes, handlers, topic rules and event types (see the module docstring)."""

    def __init__(self, name: str, *, title: str = "", description: str = "") -> None:
        self.name = name
        self.title = title or name
        self.description = description
        self.commands: list[Command] = []
        self.routes: list[BaseRoute] = []
        self.public_routes: list[BaseRoute] = []
        """The read routes that need no bearer token even when authentication is on."""
        self.handlers: dict[str, Handler] = {}
        self.topics: list[TopicRule] = []
        self.events: dict[str, EventType] = {}
        self.proxies: dict[str, ProxyCommand] = {}
        """The proxied commands, by event type (the gateway forwards their cancels)."""
        self.proxy_routes: list[ProxyRoute] = []
        """The read routes answered by an upstream."""

    def __repr__(self) -> str:
        return f"Domain({self.name!r}: {len(self.commands)} commands, {len(self.handlers)} handlers)"

    def command(
        self,
        method: str,
        path: str,
        *,
        event: str,
        schema: dict[str, Any] | None = None,
        summary: str = "",
        subject: str | None = None,
    ) -> Callable[[CommandFunction], CommandFunction]:
        """Declare ``method path`` as a command that becomes a request event of type ``event``.

        The decorated function gets the path parameters and the body (already valid against
        ``schema``), and the authenticated subject as ``caller=`` if it has that keyword; it
        returns the request event's data; it may raise
        :class:`~herald.HTTPProblem` for what a schema cannot say (a path parameter out of range).
        """
        method = method.upper()
        if method not in COMMAND_METHODS:
            raise DomainError(f"{method} {path}: commands are one of {COMMAND_METHODS}")
        if not path.startswith("/"):
            raise DomainError(f"{path!r}: a command path starts with '/'")
        check_event_type(event)
        validate = compile_schema(schema) if schema is not None else None

        def register(fn: CommandFunction) -> CommandFunction:
            for existing in self.commands:
                if (existing.method, existing.path) == (method, path):
                    raise DomainError(f"{method} {path} is declared twice in domain {self.name!r}")
            takes_caller = "caller" in inspect.signature(fn).parameters
            self.commands.append(Command(method, path, event, fn, summary or (fn.__doc__ or "").strip(),
                                         schema, subject, validate, takes_caller))
            return fn

        return register

    def proxy(
        self,
        method: str,
        path: str,
        *,
        event: str,
        upstream: str,
        timeout: float = 10.0,
        attempts: int = 5,
        backoff: Backoff | None = None,
        schema: dict[str, Any] | None = None,
        summary: str = "",
        subject: str | None = None,
        cancel: str | None = None,
        concurrency: int | None = None,
        topics: Iterable[str] = (),
    ) -> ProxyCommand:
        """Declare ``method path`` as a command that a worker forwards to ``upstream`` (see :mod:`herald.proxy`).

        Registers the command (its body, valid against ``schema``, is the request event's data) and
        its handler. ``upstream`` and ``cancel`` are URL templates, and ``topics`` topic templates,
        filled with the path parameters and ``{operation_id}``; ``timeout`` is seconds per attempt,
        ``attempts`` tries in all; ``concurrency`` bounds the requests in flight to the upstream's origin.
        """
        from herald.proxy.forward import ProxyHandler  # httpx is imported only by domains that proxy

        try:
            spec = ProxyCommand(method.upper(), path, event, upstream, timeout=timeout, attempts=attempts,
                                backoff=backoff or Backoff(), cancel=cancel, concurrency=concurrency,
                                topics=tuple(topics))
        except ProxySpecError as exc:
            raise DomainError(f"{method.upper()} {path}: {exc}") from None
        if event in self.handlers:
            raise DomainError(f"{event} has two handlers in domain {self.name!r}")
        self.command(method, path, event=event, schema=schema, summary=summary or f"Forwarded to {upstream}",
                     subject=subject)(_request_data)
        self.handler(event)(ProxyHandler(spec))
        self.proxies[event] = spec
        return spec

    def proxy_route(self, path: str, upstream: str, *, timeout: float = 10.0, public: bool = False) -> ProxyRoute:
        """Declare a read route answered by a ``GET`` on ``upstream`` (a URL template of the path parameters)."""
        from herald.http.proxy import reverse_proxy  # the gateway's side: Starlette and httpx

        try:
            spec = ProxyRoute(path, upstream, timeout=timeout, public=public)
        except ProxySpecError as exc:
            raise DomainError(f"GET {path}: {exc}") from None
        self.route("GET", path, name=f"proxy:{path}", public=public)(reverse_proxy(spec))
        self.proxy_routes.append(spec)
        return spec

    def handler(self, event_type: str) -> Callable[[Handler], Handler]:
        """Declare the worker handler of request events of ``event_type``."""
        check_event_type(event_type)

        def register(fn: Handler) -> Handler:
            if event_type in self.handlers:
                raise DomainError(f"{event_type} has two handlers in domain {self.name!r}")
            self.handlers[event_type] = fn
            return fn

        return register

    def route(
        self, method: str | Iterable[str], path: str, *, name: str | None = None, public: bool = False
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Declare a read route: a Starlette endpoint ``async def endpoint(request) -> Response``.

        With bearer authentication on, a read route needs a valid token unless it is ``public``.
        """
        methods = [method] if isinstance(method, str) else list(method)

        def register(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            route = Route(path, fn, methods=[m.upper() for m in methods], name=name)
            self.routes.append(route)
            if public:
                self.public_routes.append(route)
            return fn

        return register

    def topic(self, pattern: str, *, subscribe: SubscribeRule = "token", summary: str = "") -> TopicRule:
        """Declare who may subscribe to the topics matching ``pattern``: anyone, a token holder or the owner."""
        rule = TopicRule(pattern, subscribe, summary)
        self.topics.append(rule)
        return rule

    def event(
        self, type: str, *, schema: dict[str, Any] | None = None, summary: str = "", topics: Iterable[str] = ()
    ) -> EventType:
        """Declare an event type this domain publishes (a response event), with its data's schema."""
        check_event_type(type)
        if schema is not None:
            compile_schema(schema)  # a broken schema fails here, not in a client's code generator
        declared = EventType(type, schema, summary, tuple(topics))
        self.events[type] = declared
        return declared


def _request_data(params: dict[str, str], body: Any) -> Any:
    """A proxied command's request event data: its validated body, as the upstream receives it."""
    return body


def check_event_type(event_type: str) -> None:
    """:class:`DomainError` unless ``event_type`` is a usable name for a domain's event type."""
    if not _EVENT_TYPE.fullmatch(event_type) or event_type.startswith("herald."):
        raise DomainError(f"{event_type!r} is not a usable event type (letters, digits, '.', '_', '-'; "
                          "'herald.' is Herald's own)")


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every domain an app serves, combined: what the gateway and the worker look things up in."""

    domains: tuple[Domain, ...]
    commands: tuple[Command, ...]
    handlers: dict[str, Handler]
    topics: tuple[TopicRule, ...]
    events: dict[str, EventType]
    proxies: dict[str, ProxyCommand] = field(default_factory=dict)
    """The proxied commands of every domain, by event type."""

    @classmethod
    def of(cls, domains: Iterable[Domain]) -> Catalog:
        """Combine ``domains``; :class:`DomainError` on a command, handler or event type declared twice."""
        domains = tuple(domains)
        seen_commands: dict[tuple[str, str], str] = {}
        handlers: dict[str, Handler] = {}
        events: dict[str, EventType] = {}
        for domain in domains:
            for command in domain.commands:
                key = (command.method, command.path)
                if key in seen_commands:
                    raise DomainError(f"{key[0]} {key[1]} is declared by {seen_commands[key]!r} and {domain.name!r}")
                seen_commands[key] = domain.name
            for event_type, handler in domain.handlers.items():
                if event_type in handlers:
                    raise DomainError(f"{event_type} has handlers in two domains")
                handlers[event_type] = handler
            for event_type, declared in domain.events.items():
                if event_type in events:
                    raise DomainError(f"event type {event_type} is declared by two domains")
                events[event_type] = declared
        return cls(domains, tuple(c for d in domains for c in d.commands), handlers,
                   tuple(t for d in domains for t in d.topics), events,
                   {event: spec for d in domains for event, spec in d.proxies.items()})

    def topic_rule(self, topic: str) -> TopicRule | None:
        """The first declared rule matching ``topic``."""
        for rule in self.topics:
            if rule.match(topic) is not None:
                return rule
        return None
