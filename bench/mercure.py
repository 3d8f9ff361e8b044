"""Scenario P through Herald's Mercure hub: updates published as Mercure form posts, beside nchan's publish.

Each update is one ``POST /.well-known/mercure`` (``topic=<IRI>&data=<tick>``, a publisher JWT in
``Authorization``), as Symfony's publisher sends it; every topic is followed by one Mercure
subscriber (``GET /.well-known/mercure?topic=<IRI>``, anonymous), which must get every update once
and in order. nchan, in the same run, gets the same ticks one per ``POST /pub/{channel}``, exactly
as in P's one-per-request case. The publisher is ``python -m bench.publisher`` with ``"via":
"mercure"`` (:func:`mercure_publisher`); the figures are P's (:func:`bench.scenarios.publish_figures`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jwt

from bench.loadgen import HTTPPool
from bench.servers import SECRET, RedisServer, Target
from bench.targets import TargetKind

HUB = "/.well-known/mercure"
FORM = "application/x-www-form-urlencoded"


def topic_iri(name: str) -> str:
    """The Mercure topic of a bench topic: an IRI, as Mercure publishers use."""
    return f"https://bench.example.com/topics/{name}"


class MercureHub(TargetKind):
    """Herald seen through its Mercure hub: subscriptions and publishes at ``/.well-known/mercure``."""

    name = "herald"
    publish_api = True

    def __init__(self, key: str = SECRET) -> None:
        self.token = jwt.encode({"mercure": {"publish": ["*"]}}, key, "HS256")

    def start(self, workdir: Path, redis: RedisServer, *, commands: bool = False) -> Target:
        raise NotImplementedError("the bench starts Herald as its herald target; this only names its requests")

    def sse_path(self, topic: str) -> str:
        return f"{HUB}?topic={quote(topic_iri(topic), safe='')}"

    def publish_request(self, topic: str) -> tuple[str, dict[str, str]]:
        return HUB, {"Authorization": f"Bearer {self.token}"}

    def publish_body(self, topic: str, event: bytes) -> tuple[bytes, str]:
        return urlencode({"topic": topic_iri(topic), "data": event}).encode(), FORM


async def mercure_throughput(kind: TargetKind, target: Target, *, events: int, topics: int, workdir: Path,
                             quiet: float = 1.0) -> dict[str, Any]:
    """``events`` updates published as fast as they go, one per request, on ``topics`` topics, each followed once.

    Herald: through the Mercure hub, to publish and to subscribe; nchan: P's one-per-request case.
    """
    # imported here: bench.scenarios lists this case, so it imports this module
    from bench.scenarios import open_receiving, publish_and_wait, publish_figures, publish_throughput, publisher_spec

    if kind.name != "herald":
        return await publish_throughput(kind, target, events=events, batch=1, topics=topics, workdir=workdir,
                                        quiet=quiet)
    names = [f"bench-m-{i}" for i in range(topics)]
    opened = await open_receiving(MercureHub(), target, names)
    spec = publisher_spec(kind, target, mode="stream", via="mercure", topics=names, count=events, batch=1,
                          concurrency=topics, publish_key=SECRET, max_seconds=30)
    stats, cpu = await publish_and_wait(target, opened.group, spec, workdir, quiet=quiet)
    return publish_figures(opened, stats, cpu, events=events, per_request=1)


async def mercure_publisher(spec: dict[str, Any], encoded: Callable[[int, int], bytes],
                            ) -> tuple[Callable[[Sequence[tuple[str, int]]], Awaitable[None]],
                                       Callable[[], Awaitable[None]]]:
    """The publisher's side: each tick a Mercure form post, its JSON as ``data``; ``(publish, close)``."""
    pool = await HTTPPool("127.0.0.1", spec["http_port"], size=int(spec.get("concurrency", 4))).start()
    hub = MercureHub(spec["publish_key"])

    async def publish(batch: Sequence[tuple[str, int]]) -> None:
        stamp = time.time_ns()
        for topic, seq in batch:  # one update per request, in order: the hub stores them as they come
            path, headers = hub.publish_request(topic)
            body, content_type = hub.publish_body(topic, encoded(seq, stamp))
            status, answer = await pool.post(path, body, content_type=content_type, headers=headers)
            if status != 200:
                raise RuntimeError(f"the Mercure hub answered {status}: {answer[:200]!r}")

    async def close() -> None:
        pool.close()

    return publish, close
