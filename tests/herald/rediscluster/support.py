"""Gateways and workers on the session's Redis Cluster, and what a test needs to look into it.

:class:`Deployment` is :class:`tests.herald.cluster.support.Cluster` on a Redis Cluster: the
same gateway and worker processes (``REDIS_URL=redis+cluster://…``), started on the test
session's :class:`tests.support.redis_cluster.LocalCluster`, which it leaves whole again when
the test ends (a killed node started again, the cluster healed). :func:`topics_on_every_master`
picks topic names whose slots are served by each master.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import redis

from herald.broker.slots import key_slot
from tests.herald.cluster.support import FAST, HeraldServer, Received, WorkerProcess, stored
from tests.support.redis_cluster import LocalCluster
from tests.support.server import TEST_SECRET

COMMAND_TYPE = "ChatMessageSent"


class Deployment:
    """One test's gateway and worker processes on the session's Redis Cluster; :meth:`close` ends them."""

    def __init__(self, cluster: LocalCluster, **env: str) -> None:
        self.cluster = cluster
        self.env = {"REDIS_URL": cluster.url, "HERALD_SECRET": TEST_SECRET, **FAST, **env}
        self.gateways: list[HeraldServer] = []
        self.workers: list[WorkerProcess] = []
        self.killed: list[int] = []

    def client(self) -> redis.RedisCluster:
        """A synchronous cluster client for assertions."""
        return self.cluster.cluster_client()

    async def gateway(self, **env: str) -> HeraldServer:
        """Start one more gateway process (``env`` on top of the deployment's)."""
        server = HeraldServer({**self.env, **env})
        self.gateways.append(server)
        return await asyncio.to_thread(server.start)

    async def worker(self, settings: str = "app.chat:chat", *, concurrency: int = 8, **env: str) -> WorkerProcess:
        """Start one more worker process."""
        worker = WorkerProcess({**self.env, **env}, settings, concurrency=concurrency)
        self.workers.append(worker)
        return await asyncio.to_thread(worker.start)

    async def kill_master_of(self, key: str) -> int:
        """SIGKILL the master serving ``key``'s slot; its port (started again at :meth:`close`)."""
        port = (await asyncio.to_thread(self.cluster.master_of, key)).port
        await asyncio.to_thread(self.cluster.kill, port)
        self.killed.append(port)
        return port

    def stored(self, topic: str) -> list[Received]:
        """A topic's history as the cluster holds it."""
        with self.client() as client:
            return stored(client, topic)

    def queued(self, event_type: str = COMMAND_TYPE, shards: int = 4) -> tuple[int, int]:
        """(entries, pending deliveries) left in every request stream of ``event_type``."""
        from herald.broker.slots import shard_tags

        entries = pending = 0
        with self.client() as client:
            for tag in shard_tags(event_type, shards):
                key = f"herald:req:{{{tag}}}"
                entries += int(client.xlen(key))
                groups: Any = client.xinfo_groups(key) if client.exists(key) else []
                pending += sum(int(g["pending"]) for g in groups)
        return entries, pending

    def logs(self, chars: int = 3000) -> str:
        """The end of every process's log, and the cluster's."""
        parts = [f"--- gateway :{g.port}\n{g.log()[-chars:]}" for g in self.gateways]
        parts += [f"--- worker {w.names}\n{w.log()[-chars:]}" for w in self.workers]
        return "\n".join(parts) + "\n" + self.cluster.logs(5)

    def close(self) -> None:
        """Stop every process, start the nodes a test killed, and wait until the cluster is whole."""
        for worker in self.workers:
            worker.stop()
        for gateway in self.gateways:
            gateway.stop()
        for port in self.killed:
            if not self.cluster.server(port).running:
                self.cluster.revive(port)
        self.cluster.heal()


def topics_on_every_master(cluster: LocalCluster, prefix: str, per_master: int) -> dict[int, list[str]]:
    """``per_master`` topic names ``<prefix><n>`` for each master (by its port), whose slots it serves."""
    masters = [n for n in cluster.nodes() if n.master and n.slots]
    out: dict[int, list[str]] = {m.port: [] for m in masters}
    for n in itertools.count():
        topic = f"{prefix}{n}"
        slot = key_slot(f"herald:topic:{{{topic}}}")
        owner = next(m for m in masters if m.serves(slot))
        if len(out[owner.port]) < per_master:
            out[owner.port].append(topic)
        if all(len(v) == per_master for v in out.values()):
            return out
    raise AssertionError("unreachable")


async def post_until_accepted(http: httpx.AsyncClient, url: str, body: dict[str, Any], *,
                              attempts: int = 60, on_refusal: Callable[[int], None] | None = None,
                              headers: dict[str, str] | None = None) -> httpx.Response:
    """POST ``body`` until it is answered ``202`` (a client retrying ``503``s, as ``Retry-After`` tells it)."""
    for _ in range(attempts):
        try:
            response = await http.post(url, json=body, headers=headers)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code in (200, 202):
            return response
        if on_refusal is not None:
            on_refusal(response.status_code if response is not None else 0)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} was refused {attempts} times")
