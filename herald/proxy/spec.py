"""What a proxied command and a proxied read route are: their upstream URL templates and retry policy. No I/O.

A :class:`ProxyCommand` binds a command (``POST /albums/{album}/thumbnails``) to an upstream URL
template (``http://thumbnailer:9000/albums/{album}``) instead of a Python handler; a
:class:`ProxyRoute` binds a read route to one. Templates take ``{name}`` placeholders: the path
parameters of the command or route and, for a command, ``{operation_id}``. A declaration that
cannot work raises :class:`ProxySpecError` when it is made, never per request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.routing import compile_path

OPERATION_ID = "operation_id"
"""The template name of the operation's id (``{operation_id}``), beside the path parameters."""
_NAME = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")
_BRACE = re.compile(r"[{}]")
_SOURCE_PREFIX = "herald"
"""A request event's ``source`` is ``herald<path>`` (herald/http/commands.py), the path its command matched."""


class ProxySpecError(ValueError):
    """A proxy declaration that cannot work (an upstream that is no http URL, an unknown template name…).

    ``key`` names the field at fault (``upstream``, ``cancel``…), for a config file's error message.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Backoff:
    """Seconds between attempts: exponential from ``initial`` by ``factor``, at most ``max``, with jitter."""

    initial: float = 0.5
    max: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.max >= self.initial and self.factor >= 1):
            raise ProxySpecError("backoff needs initial > 0, max >= initial and factor >= 1, got "
                                 f"initial={self.initial}, max={self.max}, factor={self.factor}", key="backoff")

    def delay(self, attempt: int, *, retry_after: float | None = None, jitter: Callable[[], float]) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1, 2, …).

        The exponential step ``initial * factor ** (attempt - 1)``, capped at ``max``, is jittered to
        between its half and its whole (``jitter()`` is uniform in [0, 1)), so workers that failed
        together do not come back together. An upstream's ``Retry-After`` is a floor, itself capped at
        ``max``: a worker holds the job while it waits.
        """
        step = min(self.max, self.initial * self.factor ** max(0, attempt - 1))
        delay = step / 2 + jitter() * step / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max))
        return delay


def template_names(template: str, key: str | None = None) -> list[str]:
    """The ``{name}`` placeholders of ``template``, in order; :class:`ProxySpecError` for a stray brace."""
    names = _NAME.findall(template)
    if _BRACE.search(_NAME.sub("", template)):
        raise ProxySpecError(f"{template!r}: placeholders are {{name}} (letters, digits, '_')", key=key)
    return names


def fill(template: str, values: Mapping[str, Any], *, encode: bool) -> str:
    """``template`` with each ``{name}`` replaced by its value (percent-encoded as one path segment if ``encode``)."""
    def one(found: re.Match[str]) -> str:
        value = str(values[found.group(1)])
        return quote(value, safe="") if encode else value

    return _NAME.sub(one, template)


def check_http_url(template: str, what: str = "upstream") -> str:
    """``template`` if it is an absolute ``http``/``https`` URL template; :class:`ProxySpecError` otherwise.

    Placeholders may not stand in the scheme or the host: a request must not choose where Herald connects.
    """
    try:
        parts = urlsplit(template)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ProxySpecError(f"{what} {template!r} is not a URL: {exc}", key=what) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProxySpecError(f"{what} must be an absolute http:// or https:// URL, got {template!r}", key=what)
    if _BRACE.search(parts.netloc):
        raise ProxySpecError(f"{what} {template!r}: placeholders may stand in the path and query, not the host",
                             key=what)
    return template


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: what one connection pool and one concurrency limit serve."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


def path_params(path: str) -> tuple[re.Pattern[str], frozenset[str]]:
    """The regex of a route path (as Starlette compiles it) and its parameter names."""
    if not path.startswith("/"):
        raise ProxySpecError(f"path {path!r} must start with '/'", key="path")
    try:
        regex, _, convertors = compile_path(path)
    except (AssertionError, ValueError) as exc:  # an unknown convertor, a parameter named twice
        raise ProxySpecError(f"path {path!r}: {exc}", key="path") from None
    return regex, frozenset(convertors)


def check_names(template: str, allowed: frozenset[str], what: str, *, key: str | None = None) -> None:
    """:class:`ProxySpecError` (``key``, default ``what``) unless every placeholder of ``template`` is ``allowed``."""
    key = key or what
    unknown = [n for n in template_names(template, key) if n not in allowed]
    if unknown:
        raise ProxySpecError(f"{what} {template!r} names {{{unknown[0]}}}, which is none of "
                             f"{', '.join('{' + a + '}' for a in sorted(allowed)) or 'nothing'}", key=key)


@dataclass(frozen=True, slots=True)
class ProxyCommand:
    """A command forwarded to an upstream HTTP service by a worker (see :mod:`herald.proxy`)."""

    method: str
    path: str
    event: str
    upstream: str
    """The URL template the worker POSTs the request event to."""
    timeout: float = 10.0
    """Seconds one attempt may take, answer included."""
    attempts: int = 5
    """Tries in all (deliveries of the request, a crashed worker's included) before ``attempts-exhausted``."""
    backoff: Backoff = field(default_factory=Backoff)
    cancel: str | None = None
    """A URL template Herald sends ``DELETE`` to when the client cancels a running operation."""
    concurrency: int | None = None
    """Requests in flight to the upstream's origin at once, per process (default ``HERALD_PROXY_CONCURRENCY``)."""
    topics: tuple[str, ...] = ()
    """Topic templates the upstream may publish to through the callback API, besides the operation's own."""
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex, params = path_params(self.path)
        if OPERATION_ID in params:
            raise ProxySpecError(f"path {self.path!r}: {{{OPERATION_ID}}} is Herald's own template name", key="path")
        object.__setattr__(self, "regex", regex)
        names = params | {OPERATION_ID}
        check_http_url(self.upstream)
        check_names(self.upstream, names, "upstream")
        if self.cancel is not None:
            check_http_url(self.cancel, "cancel")
            check_names(self.cancel, names, "cancel")
        for topic in self.topics:
            if topic.startswith("operations/"):
                raise ProxySpecError(f"topic {topic!r}: the operation's own topic is always allowed; "
                                     "operations/… topics of others never are", key="topics")
            check_names(topic, names, "topic", key="topics")
        if not self.timeout > 0:
            raise ProxySpecError(f"timeout must be > 0 seconds, got {self.timeout}", key="timeout")
        if not (isinstance(self.attempts, int) and self.attempts >= 1):
            raise ProxySpecError(f"attempts must be an integer >= 1, got {self.attempts!r}", key="attempts")
        if self.concurrency is not None and not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise ProxySpecError(f"concurrency must be an integer >= 1, got {self.concurrency!r}", key="concurrency")

    @property
    def origin(self) -> str:
        """The upstream's ``scheme://host:port``."""
        return origin(self.upstream)

    def params(self, source: str) -> dict[str, str]:
        """The path parameters of the command a request event came from, read back from its ``source``.

        The gateway sets ``source`` to ``herald`` + the path that matched this command, so matching it
        again gives what the command got; ``{}`` for an event from elsewhere.
        """
        path = source[len(_SOURCE_PREFIX):] if source.startswith(_SOURCE_PREFIX + "/") else ""
        found = self.regex.match(path)
        return found.groupdict() if found else {}

    def values(self, params: Mapping[str, str], operation_id: str) -> dict[str, str]:
        """What the templates are filled with: the path parameters and ``operation_id``."""
        return {**params, OPERATION_ID: operation_id}

    def upstream_url(self, params: Mapping[str, str], operation_id: str) -> str:
        """The URL to POST this operation's request event to; :class:`ProxySpecError` if a parameter is missing."""
        return self._fill(self.upstream, params, operation_id, encode=True)

    def cancel_url(self, params: Mapping[str, str], operation_id: str) -> str | None:
        """The URL to send ``DELETE`` to on a cancel, when one is declared."""
        return None if self.cancel is None else self._fill(self.cancel, params, operation_id, encode=True)

    def topic_names(self, params: Mapping[str, str], operation_id: str) -> list[str]:
        """The topics this operation's upstream may publish to, besides the operation's own."""
        return [self._fill(t, params, operation_id, encode=False) for t in self.topics]

    def _fill(self, template: str, params: Mapping[str, str], operation_id: str, *, encode: bool) -> str:
        try:
            return fill(template, self.values(params, operation_id), encode=encode)
        except KeyError as exc:
            raise ProxySpecError(f"the request event carries no path parameter {exc} for {template!r}") from None


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """A read route answered by a ``GET`` on an upstream: the gateway passes the answer on."""

    path: str
    upstream: str
    timeout: float = 10.0
    public: bool = False
    """Whether it needs no bearer token when authentication is on (as ``Domain.route(public=True)``)."""

    def __post_init__(self) -> None:
        _, params = path_params(self.path)
        check_http_url(self.upstream)
        check_names(self.upstream, params, "upstream")
        if not self.timeout > 0:
            raise ProxySpecError(f"timeout must be > 0 seconds, got {self.timeout}", key="timeout")

    @property
    def origin(self) -> str:
        """The upstream's ``scheme://host:port``."""
        return origin(self.upstream)

    def upstream_url(self, params: Mapping[str, Any]) -> str:
        """The URL to ``GET`` for a request with these path parameters."""
        return fill(self.upstream, params, encode=True)
