"""The state one gateway process shares between its endpoints, and what a domain's read routes may use.

A read route gets it with ``Gateway.of(request)``: :meth:`Gateway.topic_urls` hands out
subscribe URLs, :meth:`Gateway.tail` and :meth:`Gateway.resource` read what workers stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from starlette.requests import HTTPConnection

from herald.auth import TokenSigner
from herald.broker.base import Broker, BrokerError, StoredEvent
from herald.domain import Catalog
from herald.http.admission import Admission
from herald.http.problems import HTTPProblem
from herald.hub import Hub
from herald.mercure import HUB_PATH as MERCURE_HUB
from herald.metrics import Metrics
from herald.operations import Operation, operation_topic
from herald.settings import Settings

if TYPE_CHECKING:
    from herald.http.access import TopicAccess
    from herald.http.commands import CommandRouter
    from herald.proxy.pool import UpstreamPool


def request_header(scope: Any, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower case), as Starlette's ``Headers.get``.

    The headers are put in a dict once per request (kept in the scope with the list it was made of): a
    command's answer reads five of them, and each ``Headers.get`` walked the list, a missing one by way
    of a ``KeyError``.
    """
    raw = scope["headers"]
    cached: tuple[Any, dict[bytes, bytes]] | None = scope.get("herald.headers")
    if cached is None or cached[0] is not raw:  # made for this list (a middleware may put another in the scope)
        cached = scope["herald.headers"] = (raw, dict(reversed(raw)))  # reversed: the first one wins
    value = cached[1].get(name)
    return value.decode("latin-1") if value is not None else None


def query_values(scope: Any) -> dict[str, list[str]]:
    """The request's query parameters, each name's values in order, parsed once per request.

    Parsed as Starlette's ``QueryParams`` parses them (``parse_qsl`` of the latin-1 query, blanks
    kept), without its multi-dict: a stream's connect read three of them, and building the
    multi-dict was most of the parse. Kept in the scope with the query it was made of.
    """
    raw = scope.get("query_string", b"")
    cached: tuple[Any, dict[str, list[str]]] | None = scope.get("herald.query")
    if cached is None or cached[0] is not raw:
        values: dict[str, list[str]] = {}
        for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
            values.setdefault(name, []).append(value)
        cached = scope["herald.query"] = (raw, values)
    return cached[1]


def query_value(scope: Any, name: str) -> str | None:
    """The last value of the query parameter ``name``, as ``QueryParams.get`` answers."""
    found = query_values(scope).get(name)
    return found[-1] if found else None


@dataclass(slots=True)
class Gateway:
    """Settings, broker, hub and token signer of this process, and the URLs they hand out."""

    settings: Settings
    broker: Broker
    hub: Hub
    signer: TokenSigner
    accepting: bool = True
    metrics: Metrics | None = None
    catalog: Catalog = field(default_factory=lambda: Catalog.of([]))
    commands: CommandRouter | None = None
    access: TopicAccess | None = None
    admission: Admission = field(default_factory=Admission)
    """The push connections and long polls held now, against their caps (:mod:`herald.http.admission`)."""
    upstreams: UpstreamPool | None = None
    """Connections to the command proxy's upstreams, when a domain proxies (read routes, cancels)."""
    _ws_origins: dict[tuple[str, str], str] = field(default_factory=dict)
    """:meth:`ws_base_url`'s answers by ``Host`` and scheme (a few entries; emptied when it holds 256)."""

    @classmethod
    def of(cls, conn: HTTPConnection) -> Gateway:
        """The gateway of the app serving this request or socket."""
        gateway: Gateway = conn.app.state.gateway
        return gateway

    async def tail(self, topic: str, count: int) -> list[StoredEvent]:
        """The last ``count`` events of ``topic``'s history, oldest first (a 503 problem if the broker is down)."""
        try:
            return await self.broker.tail(topic, count)
        except BrokerError as exc:
            raise _unavailable() from exc

    async def resource(self, path: str) -> dict[str, Any] | None:
        """The document a worker stored at ``path`` (``Context.put_resource``), or ``None``."""
        try:
            return await self.broker.get_resource(path)
        except BrokerError as exc:
            raise _unavailable() from exc

    def base_url(self, conn: HTTPConnection) -> str:
        """The prefix for HTTP URLs: ``HERALD_PUBLIC_URL``, or empty for relative URLs."""
        return self.settings.public_url

    def ws_base_url(self, conn: HTTPConnection) -> str:
        """The ``ws://`` or ``wss://`` origin for WebSocket URLs, or empty for a relative ``/ws`` URL.

        Absolute only from ``HERALD_PUBLIC_URL``, or for a ``Host`` named in ``HERALD_TRUSTED_HOSTS``:
        a client-chosen ``Host`` must not send the next client, token and all, to another server.
        """
        if self.settings.public_url:
            return "ws" + self.settings.public_url.removeprefix("http")
        host = request_header(conn.scope, b"host") or ""
        key = (host, conn.scope.get("scheme", "http"))
        origin = self._ws_origins.get(key)
        if origin is None:
            name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
            if not name or (port and not (port.isascii() and port.isdigit())):
                name = host
            if name not in self.settings.trusted_hosts:
                origin = ""
            else:
                origin = f"{'wss' if key[1] in ('https', 'wss') else 'ws'}://{host}"  # the URL's scheme, unbuilt
            if len(self._ws_origins) >= 256:  # the Host is the client's to choose: keep the map small
                self._ws_origins.clear()
            self._ws_origins[key] = origin
        return origin

    def mercure_link(self) -> str:
        """The ``Link`` header value that advertises the Mercure hub (``rel="mercure"``), for a resource's response.

        Absolute with ``HERALD_PUBLIC_URL``, relative (to the resource's URL) without.
        """
        return f'<{self.settings.public_url}{MERCURE_HUB}>; rel="mercure"'

    def topic_urls(self, conn: HTTPConnection, topics: list[str], *, subject: str | None = None) -> dict[str, str]:
        """``subscribe_url`` (SSE) and ``websocket_url`` for ``topics``, each with a token opening them."""
        token = self.signer.issue(topics, subject=subject)
        query = "&".join("topic=" + quote(t, safe="/") for t in topics)
        return {
            "subscribe_url": f"{self.base_url(conn)}/topics/events?{query}&token={token}"
            if len(topics) != 1
            else f"{self.base_url(conn)}/topics/{quote(topics[0], safe='/')}/events?token={token}",
            "websocket_url": f"{self.ws_base_url(conn)}/ws?{query}&token={token}",
        }

    def operation_body(self, conn: HTTPConnection, op: Operation, *, subject: str | None = None) -> dict[str, Any]:
        """The public representation of an operation, with its URLs."""
        base = self.base_url(conn)
        topic = operation_topic(op.id)
        token = self.signer.issue([topic], subject=subject)
        body: dict[str, Any] = {
            "id": op.id,
            "type": op.type,
            "status": op.status.value,
            "created_at": op.created_at,
            "updated_at": op.updated_at,
            "operation_url": f"{base}/operations/{op.id}",
            "events_url": f"{base}/operations/{op.id}/events?token={token}",
            "subscribe_url": f"{base}/operations/{op.id}/events?token={token}",
            "websocket_url": f"{self.ws_base_url(conn)}/ws?topic={quote(topic, safe='/')}&token={token}",
            "result": op.result,
            "error": op.error,
        }
        if op.location:
            body["location"] = f"{base}{op.location}"
        if op.cancel_requested and not op.status.terminal:
            body["cancel_requested"] = True
        return body


def _unavailable() -> HTTPProblem:
    return HTTPProblem(503, "the broker is unreachable", kind="broker-unavailable", headers={"Retry-After": "2"})
