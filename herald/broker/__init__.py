"""Brokers, chosen by URL scheme: ``memory://`` (embedded default) or ``redis://``/``rediss://``."""

from __future__ import annotations

from typing import Any

from herald.broker.base import Broker


def create_broker(url: str | None, **options: Any) -> Broker:
    """The broker for ``url`` (``None`` or ``memory://`` → in-process), configured with ``options``.

    Options: ``history_size``, ``operation_ttl``, ``history_ttl``, ``visibility_timeout``.
    """
    if not url or url.startswith("memory://"):
        from herald.broker.memory import MemoryBroker

        return MemoryBroker(**options)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from herald.broker.redis import RedisBroker

        return RedisBroker(url, **options)
    raise ValueError(f"no broker for URL scheme of {url!r}; use memory:// or redis://")
