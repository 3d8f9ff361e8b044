"""Brokers, chosen by URL scheme: ``memory://`` (embedded default), ``redis://``/``rediss://``, or a Redis Cluster's
``redis+cluster://``/``rediss+cluster://``."""

from __future__ import annotations

from typing import Any

from herald.broker.base import Broker


def create_broker(url: str | None, **options: Any) -> Broker:
    """The broker for ``url`` (``None`` or ``memory://`` → in-process), configured with ``options``.

    Options: ``history_size``, ``operation_ttl``, ``history_ttl``, ``visibility_timeout``; on a Redis Cluster also
    ``shards``, ``wait_replicas`` and ``wait_timeout`` (:class:`herald.broker.cluster.ClusterBroker`).
    """
    if not url or url.startswith("memory://"):
        from herald.broker.memory import MemoryBroker

        return MemoryBroker(**options)
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from herald.broker.cluster import ClusterBroker

        return ClusterBroker(url, **options)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from herald.broker.redis import RedisBroker

        return RedisBroker(url, **options)
    raise ValueError(f"no broker for URL scheme of {url!r}; use memory://, redis:// or redis+cluster://")
