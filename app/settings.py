"""Settings: the only place that reads the environment.

Every knob Herald has is a field here, with its environment variable and its
default. Callers receive a ``Settings`` instance; nothing else calls ``os.environ``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """An environment variable holds a value Herald cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class Settings:
    """Herald's configuration, read once at start-up (see ``from_env``)."""

    # Broker
    redis_url: str | None = None
    """``REDIS_URL``; unset means the embedded memory broker."""
    embedded_worker: bool = True
    """``HERALD_EMBEDDED_WORKER``: run the chat worker inside the gateway (default on the memory broker)."""

    # Identity
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    """``HERALD_SECRET``: signs subscribe tokens; random per process when unset (single process only)."""
    public_url: str = ""
    """``HERALD_PUBLIC_URL``: absolute prefix for the URLs Herald hands out; empty means relative URLs."""

    # Timeouts
    operation_ttl: int = 86400
    """``HERALD_OPERATION_TTL`` seconds an operation (and its topic history) is kept."""
    history_ttl: int = 86400
    """``HERALD_HISTORY_TTL`` seconds a domain topic's history is kept after its last event."""
    heartbeat: float = 15.0
    """``HERALD_HEARTBEAT`` seconds between SSE comment heartbeats and WebSocket idle pings."""
    retry_ms: int = 2000
    """``HERALD_RETRY_MS``: the SSE ``retry:`` reconnection delay sent to clients."""
    max_wait: float = 30.0
    """``HERALD_MAX_WAIT``: cap on ``Prefer: wait=N`` and ``?wait=N`` in seconds."""
    token_ttl: int = 3600
    """``HERALD_TOKEN_TTL`` seconds a subscribe token is valid."""
    visibility_timeout: float = 30.0
    """``HERALD_VISIBILITY_TIMEOUT``: seconds before an unacknowledged request event is redelivered."""
    slow_client_grace: float = 5.0
    """``HERALD_SLOW_CLIENT_GRACE``: seconds an overflowed client may take to accept its disconnect notice."""

    # Limits
    history_size: int = 1000
    """``HERALD_HISTORY_SIZE``: events kept per topic for resume."""
    queue_size: int = 1000
    """``HERALD_QUEUE_SIZE``: events buffered per connection before it is cut off as slow."""
    max_body: int = 65536
    """``HERALD_MAX_BODY`` bytes in a command body (413 beyond)."""
    max_attempts: int = 5
    """``HERALD_MAX_ATTEMPTS`` deliveries of a request event before its operation fails."""
    max_topics_per_connection: int = 64
    """``HERALD_MAX_TOPICS``: topics one SSE or WebSocket connection may follow."""
    max_ws_message: int = 65536
    """``HERALD_MAX_WS_MESSAGE`` bytes in one WebSocket message from a client."""
    max_connections: int = 20000
    """``HERALD_MAX_CONNECTIONS``: SSE + WebSocket connections per process (503 beyond)."""
    rate_limit: int = 0
    """``HERALD_RATE_LIMIT``: commands per client per second (0 = unlimited)."""
    max_json_depth: int = 32
    """``HERALD_MAX_JSON_DEPTH``: nesting levels allowed in a JSON body (422 beyond)."""
    max_json_string: int = 16384
    """``HERALD_MAX_JSON_STRING``: characters in one JSON string or key of a body (422 beyond)."""

    # Worker
    worker_concurrency: int = 8
    """``HERALD_WORKER_CONCURRENCY``: request events one worker process handles at once."""

    # Security
    cors_origins: tuple[str, ...] = ()
    """``HERALD_CORS_ORIGINS``: comma-separated origins allowed by CORS; empty disables CORS."""
    jwt_secret: str | None = None
    """``HERALD_JWT_SECRET``: HS256 key for bearer tokens on commands; unset (with no public key) = anonymous."""
    jwt_public_key: str | None = None
    """``HERALD_JWT_PUBLIC_KEY``: PEM key for RS256/ES256 bearer tokens."""
    jwt_audience: str | None = None
    """``HERALD_JWT_AUDIENCE``: required ``aud`` claim, when set."""
    jwt_issuer: str | None = None
    """``HERALD_JWT_ISSUER``: required ``iss`` claim, when set."""

    # Logging
    log_level: str = "info"
    """``HERALD_LOG_LEVEL``."""

    @property
    def auth_enabled(self) -> bool:
        """Whether commands need a bearer token."""
        return bool(self.jwt_secret or self.jwt_public_key)

    def broker_options(self) -> dict[str, float]:
        """The keyword options ``create_broker`` takes, from these settings."""
        return {
            "history_size": self.history_size,
            "operation_ttl": self.operation_ttl,
            "history_ttl": self.history_ttl,
            "visibility_timeout": self.visibility_timeout,
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``HERALD_*`` variable (and ``REDIS_URL``) from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        redis_url = env.get("REDIS_URL") or None
        embedded_default = "0" if redis_url else "1"
        secret = env.get("HERALD_SECRET") or secrets.token_urlsafe(32)
        return cls(
            redis_url=redis_url,
            embedded_worker=env.get("HERALD_EMBEDDED_WORKER", embedded_default) not in ("0", "false", "no"),
            secret=secret,
            public_url=env.get("HERALD_PUBLIC_URL", "").rstrip("/"),
            operation_ttl=_int(env, "HERALD_OPERATION_TTL", 86400, minimum=1),
            history_ttl=_int(env, "HERALD_HISTORY_TTL", 86400, minimum=1),
            heartbeat=_float(env, "HERALD_HEARTBEAT", 15.0, minimum=0.05),
            retry_ms=_int(env, "HERALD_RETRY_MS", 2000, minimum=0),
            max_wait=_float(env, "HERALD_MAX_WAIT", 30.0, minimum=0.0),
            token_ttl=_int(env, "HERALD_TOKEN_TTL", 3600, minimum=1),
            visibility_timeout=_float(env, "HERALD_VISIBILITY_TIMEOUT", 30.0, minimum=0.1),
            slow_client_grace=_float(env, "HERALD_SLOW_CLIENT_GRACE", 5.0, minimum=0.0),
            history_size=_int(env, "HERALD_HISTORY_SIZE", 1000, minimum=1),
            queue_size=_int(env, "HERALD_QUEUE_SIZE", 1000, minimum=1),
            max_body=_int(env, "HERALD_MAX_BODY", 65536, minimum=64),
            max_attempts=_int(env, "HERALD_MAX_ATTEMPTS", 5, minimum=1),
            max_topics_per_connection=_int(env, "HERALD_MAX_TOPICS", 64, minimum=1),
            max_ws_message=_int(env, "HERALD_MAX_WS_MESSAGE", 65536, minimum=256),
            max_connections=_int(env, "HERALD_MAX_CONNECTIONS", 20000, minimum=1),
            rate_limit=_int(env, "HERALD_RATE_LIMIT", 0, minimum=0),
            max_json_depth=_int(env, "HERALD_MAX_JSON_DEPTH", 32, minimum=2),
            max_json_string=_int(env, "HERALD_MAX_JSON_STRING", 16384, minimum=16),
            worker_concurrency=_int(env, "HERALD_WORKER_CONCURRENCY", 8, minimum=1),
            cors_origins=_list(env, "HERALD_CORS_ORIGINS"),
            jwt_secret=env.get("HERALD_JWT_SECRET") or None,
            jwt_public_key=env.get("HERALD_JWT_PUBLIC_KEY") or None,
            jwt_audience=env.get("HERALD_JWT_AUDIENCE") or None,
            jwt_issuer=env.get("HERALD_JWT_ISSUER") or None,
            log_level=env.get("HERALD_LOG_LEVEL", "info").lower(),
        )
