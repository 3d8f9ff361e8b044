"""Settings: the only place that reads the environment.

Every knob Herald has is a field here, with its environment variable and its
default. Callers receive a ``Settings`` instance; nothing else calls ``os.environ``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class SettingsError(ValueError):
    """An environment variable holds a value Herald cannot use."""


ANONYMOUS_RATE_LIMIT = 20
"""Commands per client per second when ``HERALD_RATE_LIMIT`` is unset and there is no bearer authentication."""
MIN_SECRET = 32
"""Bytes in ``HERALD_SECRET`` and ``HERALD_JWT_SECRET`` at the least: an HMAC key shorter than its hash is guessable."""
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env(name: str, default: Any, *, minimum: float | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A settings field read from the environment variable ``name`` (its default stated once, here)."""
    meta = {"env": name, "minimum": minimum}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _parse(name: str, raw: str, kind: Any, minimum: float | None) -> Any:
    """``raw`` as the field's type; :class:`SettingsError` naming the variable otherwise."""
    if isinstance(kind, str):
        kind = kind.removesuffix(" | None")  # set means a value of the type; unset is the field's None
    if kind in ("bool", bool):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{name} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")
    if kind in ("int", int, "float", float):
        convert = int if kind in ("int", int) else float
        try:
            value: float = convert(raw)
        except ValueError as exc:
            number = "an integer" if convert is int else "a number"
            raise SettingsError(f"{name} must be {number}, got {raw!r}") from exc
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name} must be >= {minimum}, got {value}")
        return value
    if str(kind).startswith("tuple"):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw


@dataclass(frozen=True, slots=True)
class Settings:
    """Herald's configuration, read once at start-up (see ``from_env``)."""

    # Broker
    redis_url: str | None = _env("REDIS_URL", None)
    """``REDIS_URL``; unset means the embedded memory broker."""
    redis_shards: int = _env("HERALD_REDIS_SHARDS", 4, minimum=1)
    """``HERALD_REDIS_SHARDS``: request streams per event type on a Redis Cluster (a multiple of its masters spreads
    best); every process of one deployment must use the same number."""
    redis_wait_replicas: int = _env("HERALD_REDIS_WAIT_REPLICAS", 0, minimum=0)
    """``HERALD_REDIS_WAIT_REPLICAS``: on a Redis Cluster, a command is answered ``202`` only once this many replicas
    hold it (``WAIT``); fewer in time is a ``503``."""
    redis_wait_timeout: float = _env("HERALD_REDIS_WAIT_TIMEOUT", 1.0, minimum=0.001)
    """``HERALD_REDIS_WAIT_TIMEOUT``: seconds ``WAIT`` may take (see ``HERALD_REDIS_WAIT_REPLICAS``)."""
    embedded_worker: bool = _env("HERALD_EMBEDDED_WORKER", True)
    """``HERALD_EMBEDDED_WORKER``: run the domains' handlers inside the gateway (default on the memory broker)."""

    # Identity
    secret: str = _env("HERALD_SECRET", None, factory=lambda: secrets.token_urlsafe(32))
    """``HERALD_SECRET``: signs subscribe tokens; random per process when unset (single process only)."""
    public_url: str = _env("HERALD_PUBLIC_URL", "")
    """``HERALD_PUBLIC_URL``: absolute prefix for the URLs Herald hands out; empty means relative URLs."""

    # Timeouts
    operation_ttl: int = _env("HERALD_OPERATION_TTL", 86400, minimum=1)
    """``HERALD_OPERATION_TTL`` seconds an operation (and its topic history) is kept."""
    history_ttl: int = _env("HERALD_HISTORY_TTL", 86400, minimum=1)
    """``HERALD_HISTORY_TTL`` seconds a domain topic's history is kept after its last event."""
    heartbeat: float = _env("HERALD_HEARTBEAT", 15.0, minimum=0.05)
    """``HERALD_HEARTBEAT`` seconds between SSE comment heartbeats (WebSocket keep-alive is the server's own ping)."""
    retry_ms: int = _env("HERALD_RETRY_MS", 2000, minimum=0)
    """``HERALD_RETRY_MS``: the SSE ``retry:`` reconnection delay sent to clients."""
    max_wait: float = _env("HERALD_MAX_WAIT", 30.0, minimum=0.0)
    """``HERALD_MAX_WAIT``: cap on ``Prefer: wait=N`` and ``?wait=N`` in seconds."""
    token_ttl: int = _env("HERALD_TOKEN_TTL", 3600, minimum=1)
    """``HERALD_TOKEN_TTL`` seconds a subscribe token is valid."""
    visibility_timeout: float = _env("HERALD_VISIBILITY_TIMEOUT", 30.0, minimum=0.1)
    """``HERALD_VISIBILITY_TIMEOUT``: seconds before an unacknowledged request event is redelivered."""
    header_timeout: float = _env("HERALD_HEADER_TIMEOUT", 10.0, minimum=0.1)
    """``HERALD_HEADER_TIMEOUT``: seconds a request's headers may take to arrive (408 and closed after; slowloris)."""
    slow_client_grace: float = _env("HERALD_SLOW_CLIENT_GRACE", 5.0, minimum=0.0)
    """``HERALD_SLOW_CLIENT_GRACE``: seconds an overflowed client may take to accept its disconnect notice."""

    # Limits
    history_size: int = _env("HERALD_HISTORY_SIZE", 1000, minimum=1)
    """``HERALD_HISTORY_SIZE``: events kept per topic for resume."""
    memory_max_events: int = _env("HERALD_MEMORY_MAX_EVENTS", 100_000, minimum=1)
    """``HERALD_MEMORY_MAX_EVENTS``: events the memory broker keeps in all topic histories (oldest evicted first)."""
    memory_max_bytes: int = _env("HERALD_MEMORY_MAX_BYTES", 64 * 1024 * 1024, minimum=1024)
    """``HERALD_MEMORY_MAX_BYTES``: bytes of encoded events the memory broker keeps in all topic histories."""
    memory_max_operations: int = _env("HERALD_MEMORY_MAX_OPERATIONS", 100_000, minimum=1)
    """``HERALD_MEMORY_MAX_OPERATIONS``: operations the memory broker keeps (ended ones forgotten first)."""
    memory_max_resources: int = _env("HERALD_MEMORY_MAX_RESOURCES", 100_000, minimum=1)
    """``HERALD_MEMORY_MAX_RESOURCES``: resource documents the memory broker keeps (least recently written go)."""
    queue_size: int = _env("HERALD_QUEUE_SIZE", 1000, minimum=1)
    """``HERALD_QUEUE_SIZE``: events buffered per connection before it is cut off as slow."""
    max_body: int = _env("HERALD_MAX_BODY", 65536, minimum=64)
    """``HERALD_MAX_BODY`` bytes in a command body (413 beyond)."""
    max_attempts: int = _env("HERALD_MAX_ATTEMPTS", 5, minimum=1)
    """``HERALD_MAX_ATTEMPTS`` deliveries of a request event before its operation fails."""
    max_topics_per_connection: int = _env("HERALD_MAX_TOPICS", 64, minimum=1)
    """``HERALD_MAX_TOPICS``: topics one SSE or WebSocket connection may follow."""
    max_ws_message: int = _env("HERALD_MAX_WS_MESSAGE", 65536, minimum=256)
    """``HERALD_MAX_WS_MESSAGE`` bytes in one WebSocket message from a client."""
    max_connections: int = _env("HERALD_MAX_CONNECTIONS", 20000, minimum=1)
    """``HERALD_MAX_CONNECTIONS``: SSE + WebSocket connections per process (503 beyond)."""
    max_connections_per_client: int = _env("HERALD_MAX_CONNECTIONS_PER_CLIENT", 100, minimum=1)
    """``HERALD_MAX_CONNECTIONS_PER_CLIENT``: SSE + WebSocket connections of one bearer subject, else address (429)."""
    max_connections_per_token: int = _env("HERALD_MAX_CONNECTIONS_PER_TOKEN", 20, minimum=1)
    """``HERALD_MAX_CONNECTIONS_PER_TOKEN``: SSE + WebSocket connections opened with one subscribe token (429)."""
    max_long_polls: int = _env("HERALD_MAX_LONG_POLLS", 1000, minimum=0)
    """``HERALD_MAX_LONG_POLLS``: ``Prefer: wait`` / ``?wait=`` requests held at once; beyond, answered at once."""
    ws_rate: float = _env("HERALD_WS_RATE", 50.0, minimum=0.0)
    """``HERALD_WS_RATE``: messages per second one WebSocket may send, in bursts of twice that (0 = off; 1008)."""
    ws_max_inflight: int = _env("HERALD_WS_MAX_INFLIGHT", 16, minimum=1)
    """``HERALD_WS_MAX_INFLIGHT``: commands one WebSocket may have unanswered (an ``error`` 429 beyond)."""
    rate_limit: int | None = _env("HERALD_RATE_LIMIT", None, minimum=0)
    """``HERALD_RATE_LIMIT``: commands per client per second (0 = unlimited); unset: see :attr:`command_rate_limit`."""
    max_json_depth: int = _env("HERALD_MAX_JSON_DEPTH", 32, minimum=2)
    """``HERALD_MAX_JSON_DEPTH``: nesting levels allowed in a JSON body (422 beyond)."""
    max_json_string: int = _env("HERALD_MAX_JSON_STRING", 16384, minimum=16)
    """``HERALD_MAX_JSON_STRING``: characters in one JSON string or key of a body (422 beyond)."""
    publish_max_body: int = _env("HERALD_PUBLISH_MAX_BODY", 1048576, minimum=64)
    """``HERALD_PUBLISH_MAX_BODY`` bytes in a ``POST /topics/{topic}/events`` body (413 beyond)."""
    publish_max_batch: int = _env("HERALD_PUBLISH_MAX_BATCH", 100, minimum=1)
    """``HERALD_PUBLISH_MAX_BATCH``: events in one published batch (422 beyond)."""
    publish_max_event: int = _env("HERALD_PUBLISH_MAX_EVENT", 65536, minimum=256)
    """``HERALD_PUBLISH_MAX_EVENT`` bytes in one published event, as Herald encodes it (422 beyond)."""
    publish_rate: int = _env("HERALD_PUBLISH_RATE", 1000, minimum=0)
    """``HERALD_PUBLISH_RATE``: events per publisher (token subject) per second, on every gateway (0 = unlimited)."""

    # Worker
    worker_concurrency: int = _env("HERALD_WORKER_CONCURRENCY", 8, minimum=1)
    """``HERALD_WORKER_CONCURRENCY``: request events one worker process handles at once."""
    worker_grace: float = _env("HERALD_WORKER_GRACE", 10.0, minimum=0.0)
    """``HERALD_WORKER_GRACE``: seconds a stopping worker lets current jobs finish before giving them back."""

    # Security
    cors_origins: tuple[str, ...] = _env("HERALD_CORS_ORIGINS", ())
    """``HERALD_CORS_ORIGINS``: comma-separated origins allowed by CORS (with credentials, so never ``*``)."""
    trusted_hosts: tuple[str, ...] = _env("HERALD_TRUSTED_HOSTS", ("localhost", "127.0.0.1", "[::1]"))
    """``HERALD_TRUSTED_HOSTS``: ``Host`` names put in absolute WebSocket URLs; for others they are relative."""
    jwt_secret: str | None = _env("HERALD_JWT_SECRET", None)
    """``HERALD_JWT_SECRET``: HS256 key for bearer tokens on commands; unset (with no public key) = anonymous."""
    jwt_public_key: str | None = _env("HERALD_JWT_PUBLIC_KEY", None)
    """``HERALD_JWT_PUBLIC_KEY``: PEM key for RS256/ES256 bearer tokens."""
    jwt_audience: str | None = _env("HERALD_JWT_AUDIENCE", None)
    """``HERALD_JWT_AUDIENCE``: required ``aud`` claim, when set."""
    jwt_issuer: str | None = _env("HERALD_JWT_ISSUER", None)
    """``HERALD_JWT_ISSUER``: required ``iss`` claim, when set."""
    publish_jwt_secret: str | None = _env("HERALD_PUBLISH_JWT_SECRET", None)
    """``HERALD_PUBLISH_JWT_SECRET``: HS256 key for publisher tokens; unset = publishers use the HERALD_JWT_* keys."""
    publish_jwt_public_key: str | None = _env("HERALD_PUBLISH_JWT_PUBLIC_KEY", None)
    """``HERALD_PUBLISH_JWT_PUBLIC_KEY``: PEM key for RS*/ES* publisher tokens (instead of the HERALD_JWT_* keys)."""

    # Logging
    log_level: str = _env("HERALD_LOG_LEVEL", "info")
    """``HERALD_LOG_LEVEL``."""

    # Mercure hub (/.well-known/mercure)
    mercure_publisher_jwt_key: str | None = _env("HERALD_MERCURE_PUBLISHER_JWT_KEY", None)
    """``HERALD_MERCURE_PUBLISHER_JWT_KEY``: HMAC secret (32+ bytes) or PEM public key of publishers' JWTs; unset =
    publishing is off."""
    mercure_subscriber_jwt_key: str | None = _env("HERALD_MERCURE_SUBSCRIBER_JWT_KEY", None)
    """``HERALD_MERCURE_SUBSCRIBER_JWT_KEY``: the same for subscribers' JWTs; unset = the publisher key."""
    mercure_jwt_algorithms: tuple[str, ...] = _env("HERALD_MERCURE_JWT_ALGORITHMS", ())
    """``HERALD_MERCURE_JWT_ALGORITHMS``: e.g. ``HS256,RS256``; unset = HS256 for a secret, a PEM key's family."""
    mercure_anonymous: bool = _env("HERALD_MERCURE_ANONYMOUS", False)
    """``HERALD_MERCURE_ANONYMOUS``: subscribers without a JWT get the public updates."""
    mercure_cors_origins: tuple[str, ...] = _env("HERALD_MERCURE_CORS_ORIGINS", ())
    """``HERALD_MERCURE_CORS_ORIGINS``: comma-separated origins whose pages may subscribe (with the cookie)."""

    # Command proxy (herald.proxy)
    callback_url: str = _env("HERALD_CALLBACK_URL", "")
    """``HERALD_CALLBACK_URL``: the gateway's absolute URL as upstreams reach it, for ``Herald-Callback``; empty =
    ``HERALD_PUBLIC_URL``."""
    proxy_concurrency: int = _env("HERALD_PROXY_CONCURRENCY", 64, minimum=1)
    """``HERALD_PROXY_CONCURRENCY``: requests in flight to one upstream origin per process, unless a command says."""
    proxy_max_response: int = _env("HERALD_PROXY_MAX_RESPONSE", 1048576, minimum=1024)
    """``HERALD_PROXY_MAX_RESPONSE`` bytes read of an upstream's answer (longer fails the operation)."""

    @property
    def auth_enabled(self) -> bool:
        """Whether commands need a bearer token."""
        return bool(self.jwt_secret or self.jwt_public_key)

    @property
    def command_rate_limit(self) -> int:
        """Commands per client per second (0 = unlimited): ``HERALD_RATE_LIMIT`` when set, else
        :data:`ANONYMOUS_RATE_LIMIT` in anonymous mode and unlimited with bearer authentication."""
        if self.rate_limit is not None:
            return self.rate_limit
        return 0 if self.auth_enabled else ANONYMOUS_RATE_LIMIT

    def broker_options(self) -> dict[str, float]:
        """The keyword options ``create_broker`` takes, from these settings (the memory broker's bounds too)."""
        options = {
            "history_size": self.history_size,
            "operation_ttl": self.operation_ttl,
            "history_ttl": self.history_ttl,
            "visibility_timeout": self.visibility_timeout,
        }
        if self.redis_url and self.redis_url.startswith(("redis+cluster://", "rediss+cluster://")):
            options.update(shards=self.redis_shards, wait_replicas=self.redis_wait_replicas,
                           wait_timeout=self.redis_wait_timeout)
        if not self.redis_url or self.redis_url.startswith("memory://"):
            options.update(max_events=self.memory_max_events, max_bytes=self.memory_max_bytes,
                           max_operations=self.memory_max_operations, max_resources=self.memory_max_resources)
        return options

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``HERALD_*`` variable (and ``REDIS_URL``) from ``env`` (default: ``os.environ``).

        An unset or empty variable means the field's default. With ``REDIS_URL`` set, the embedded
        worker defaults to off, and ``HERALD_SECRET`` is required: every gateway must sign subscribe
        tokens alike, or a token one gateway hands out is refused by the next.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = spec.metadata["env"]
            raw = env.get(name, "")
            if raw == "":
                continue
            values[spec.name] = _parse(name, raw, spec.type, spec.metadata["minimum"])
        if "redis_url" in values:
            values.setdefault("embedded_worker", False)
            if "secret" not in values:
                raise SettingsError(
                    "HERALD_SECRET is required with REDIS_URL: every gateway must sign subscribe tokens with the "
                    "same secret (set it to the same long random string, e.g. `openssl rand -hex 32`, everywhere)")
        if "*" in values.get("cors_origins", ()):
            raise SettingsError("HERALD_CORS_ORIGINS=* is refused: CORS here allows credentials (the token "
                                "cookie), so list the origins that may call Herald")
        for name, field_name in (("HERALD_SECRET", "secret"), ("HERALD_JWT_SECRET", "jwt_secret"),
                                 ("HERALD_PUBLISH_JWT_SECRET", "publish_jwt_secret")):
            if field_name in values and len(values[field_name].encode()) < MIN_SECRET:
                raise SettingsError(f"{name} must be at least {MIN_SECRET} bytes (e.g. `openssl rand -hex 32`)")
        if "public_url" in values:
            values["public_url"] = values["public_url"].rstrip("/")
        if "callback_url" in values:
            values["callback_url"] = values["callback_url"].rstrip("/")
        if "log_level" in values:
            values["log_level"] = values["log_level"].lower()
        return cls(**values)
