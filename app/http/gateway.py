"""The state one gateway process shares between its endpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.requests import HTTPConnection

from app.auth import TokenSigner
from app.broker.base import Broker
from app.hub import Hub
from app.metrics import Metrics
from app.operations import Operation, operation_topic
from app.settings import Settings


@dataclass(slots=True)
class Gateway:
    """Settings, broker, hub and token signer of this process, and the URLs they hand out."""

    settings: Settings
    broker: Broker
    hub: Hub
    signer: TokenSigner
    accepting: bool = True
    metrics: Metrics | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, conn: HTTPConnection) -> Gateway:
        """The gateway of the app serving this request or socket."""
        gateway: Gateway = conn.app.state.gateway
        return gateway

    def base_url(self, conn: HTTPConnection) -> str:
        """The prefix for HTTP URLs: ``HERALD_PUBLIC_URL``, or empty for relative URLs."""
        return self.settings.public_url

    def ws_base_url(self, conn: HTTPConnection) -> str:
        """The absolute ``ws://`` or ``wss://`` origin clients should use."""
        if self.settings.public_url:
            return "ws" + self.settings.public_url.removeprefix("http")
        scheme = "wss" if conn.url.scheme in ("https", "wss") else "ws"
        host = conn.headers.get("host") or f"{conn.url.hostname}:{conn.url.port}"
        return f"{scheme}://{host}"

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
