"""``GET /metrics``: this gateway process in the Prometheus text format.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (tests build many apps
in one process). Two kinds of figures:

* read at scrape time from the objects that already count them (the hub's connections,
  frames and slow-consumer cut-offs, the broker's errors and reconnects), so the hot path
  pays nothing for them;
* counted as they happen, here: operations by status, commands refused by a limit, and
  the POST-to-push latency.

POST-to-push latency is measured inside one process: from the moment this gateway accepted
a command (the broker stored its request event) to the moment the first frame of that
operation is handed to a local connection's queue. An operation whose client listens on
another gateway process is not measured (that process never saw the POST).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from herald.broker.base import Broker, FrameSink
from herald.hub import Hub
from herald.protocol import STATUS_EVENT_PREFIX, Frame

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_OPERATION_PREFIX = "operations/"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LIMIT_REASONS = frozenset({
    "rate-limited",          # a client's commands per second (HERALD_RATE_LIMIT)
    "publish-rate",          # a publisher's events per second (HERALD_PUBLISH_RATE)
    "ws-message-rate",       # a WebSocket's incoming messages per second
    "ws-commands-inflight",  # a WebSocket's commands not yet answered
    "ws-queue-overflow",     # a WebSocket that does not read its replies
    "connections-process",   # this process's push connections (HERALD_MAX_CONNECTIONS)
    "connections-client",    # one client's push connections
    "connections-token",     # one subscribe token's push connections
    "long-polls",            # requests held open by Prefer: wait / ?wait=
    "header-timeout",        # a request whose headers did not arrive in time (slowloris)
    "history-evicted",       # topic history dropped by the memory broker's bound
})
"""The reasons ``herald_limited_total`` counts: a fixed set, so the metric's cardinality is too."""
LATENCY_HORIZON = 60.0
"""Seconds an accepted operation waits for its first push before it is no longer timed."""


class _LiveCollector(Collector):
    """Figures read from the hub and the broker when Prometheus scrapes."""

    def __init__(self, hub: Hub, broker: Broker) -> None:
        self.hub = hub
        self.broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """One family per figure, with this instant's values."""
        hub = self.hub
        connections = GaugeMetricFamily("herald_connections", "Open push connections, by transport",
                                        labels=["transport"])
        counts = hub.connections_by_transport()
        for transport in ("sse", "ws", "wait"):
            connections.add_metric([transport], counts.get(transport, 0))
        yield connections
        yield GaugeMetricFamily("herald_topics", "Topics this process follows for its connections",
                                value=hub.topic_count())
        yield CounterMetricFamily("herald_events_delivered", "Live frames handed to connection queues",
                                  value=hub.frames_dispatched)
        yield CounterMetricFamily("herald_events_dropped",
                                  "Frames not delivered because their connection was cut off or closing "
                                  "(the client resumes them from its cursor)",
                                  value=hub.frames_dropped)
        yield CounterMetricFamily("herald_slow_consumer_disconnects",
                                  "Connections cut off because their queue overflowed", value=hub.slow_disconnects)
        yield CounterMetricFamily("herald_broker_errors", "Broker calls that failed (store unreachable)",
                                  value=self.broker.errors)
        yield CounterMetricFamily("herald_broker_reconnects", "Times the broker's fan-out connection was re-opened",
                                  value=self.broker.reconnects)


class Metrics:
    """This process's Prometheus registry and the counters the gateway feeds."""

    def __init__(self, hub: Hub, broker: Broker, *, track: int = 10000, horizon: float = LATENCY_HORIZON) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_LiveCollector(hub, broker))
        self.operations = Counter(
            "herald_operations", "Operations accepted here (pending) and status changes seen by this process",
            ["status"], registry=self.registry,
        )
        self._pending: Any = None
        self.rejected = Counter(
            "herald_commands_rejected", "Commands refused before acceptance, by reason", ["reason"],
            registry=self.registry,
        )
        self.limits = Counter(
            "herald_limited", "Requests, connections and messages refused or cut off by a limit, by reason",
            ["reason"], registry=self.registry,
        )
        for reason in LIMIT_REASONS:
            self.limits.labels(reason)  # every reason shows, at 0, before it first happens
        self.push_latency = Histogram(
            "herald_push_latency_seconds",
            "From a command accepted by this process to its operation's first frame pushed by this process",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._tallies: list[tuple[str, Callable[[], int], list[int]]] = []
        self._track = track
        self._horizon = horizon
        self._accepted_at: OrderedDict[str, float] = OrderedDict()

    def count_from(self, reason: str, read: Callable[[], int]) -> None:
        """Count ``reason`` from a process-wide tally that ``read`` returns (synced at each scrape)."""
        if reason not in LIMIT_REASONS:
            raise ValueError(f"unknown limit reason {reason!r}")
        self._tallies.append((reason, read, [read()]))

    def limited(self, reason: str) -> None:
        """Count one refusal by a limit; ``reason`` is one of :data:`LIMIT_REASONS`."""
        if reason not in LIMIT_REASONS:
            raise ValueError(f"unknown limit reason {reason!r}")
        self.limits.labels(reason).inc()

    def accepted(self, operation_id: str) -> None:
        """A new operation was accepted here: count it and start its latency clock."""
        pending = self._pending
        if pending is None:  # looked up once (labels() takes a lock and builds a key), made on first use as before
            pending = self._pending = self.operations.labels("pending")
        pending.inc()
        now = time.monotonic()
        clocks = self._accepted_at
        clocks[operation_id] = now
        # bounded in age and count: most operations are never pushed by this process (polled, or followed
        # on another gateway), and their clocks must not pile up
        while clocks and (len(clocks) > self._track or now - next(iter(clocks.values())) > self._horizon):
            clocks.popitem(last=False)

    def observe(self, frame: Frame) -> None:
        """Account for a live frame before the hub fans it out."""
        if not frame.topic.startswith(_OPERATION_PREFIX):
            return
        if frame.type.startswith(STATUS_EVENT_PREFIX):
            status = frame.type[len(STATUS_EVENT_PREFIX):]
            if status != "progress":
                self.operations.labels(status).inc()
        started = self._accepted_at.pop(frame.topic[len(_OPERATION_PREFIX):], None)
        if started is not None:
            self.push_latency.observe(time.monotonic() - started)

    def sink(self, dispatch: FrameSink) -> FrameSink:
        """``dispatch`` (the hub's) preceded by :meth:`observe`, to install as the broker's sink."""
        observe = self.observe

        def observed(frame: Frame) -> None:
            observe(frame)
            dispatch(frame)

        return observed

    def render(self) -> bytes:
        """The text exposition of every metric."""
        for reason, read, seen in self._tallies:
            now = read()
            if now > seen[0]:
                self.limits.labels(reason).inc(now - seen[0])
                seen[0] = now
        return generate_latest(self.registry)
