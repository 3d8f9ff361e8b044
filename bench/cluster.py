"""Scenarios C and D on a Redis Cluster: Herald's ClusterBroker on three masters on this machine.

* :class:`RedisCluster`: three ``redis-server --cluster-enabled yes`` processes (masters only: the
  bench measures the cost of the cluster's routing and sharded pub/sub, not replication) formed
  with ``redis-cli --cluster create``, in the case's directory, stopped with it.
* :func:`start_herald_cluster`: the same gateway and worker as the single-Redis case, with
  ``REDIS_URL=redis+cluster://…``; the case's single Redis stays idle.
* :func:`cluster_publisher`: scenario C's publisher for the cluster, as fast as the single-Redis
  one: one raw connection per master, each event's append-and-SPUBLISH (exactly what a worker
  sends, ``ClusterBroker.publish_command``) written to the master of its topic's slot.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis

from bench import servers
from bench.servers import HOST, Managed, ProcTree, RedisServer, Target, free_port, spawn

MASTERS = 3


class RedisCluster(RedisServer):
    """Three cluster-enabled redis-server processes formed into one cluster (no replicas)."""

    def __init__(self, workdir: Path, masters: int = MASTERS) -> None:
        super().__init__(workdir)
        self.ports = [free_port() for _ in range(masters)]
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)
        self.nodes: list[Managed] = []

    def start(self) -> RedisCluster:
        """Start the masters, form the cluster, and wait until every node says ``cluster_state:ok``."""
        for port in self.ports:
            self.nodes.append(spawn(f"redis-{port}", [
                "redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--maxclients", "19000", "--tcp-backlog", "4096", "--loglevel", "warning",
                "--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                "--cluster-port", str(free_port()),
            ], self.workdir))
        for port in self.ports:
            _wait_answering(port)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in _ask(port, b"CLUSTER INFO") for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the bench's Redis Cluster did not become ok")
            time.sleep(0.05)
        return self

    def tree(self) -> ProcTree:
        """The three redis-server processes."""
        return ProcTree(*(n.pid for n in self.nodes))

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def _ask(port: int, command: bytes) -> bytes:
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(command + b"\r\n")
            return sock.recv(4096)
    except OSError:
        return b""


def _wait_answering(port: int) -> None:
    deadline = time.monotonic() + 10
    while not _ask(port, b"PING").startswith(b"+PONG"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on {port} did not answer PING")
        time.sleep(0.02)


@dataclass
class ClusterTarget(Target):
    """Herald on the bench's Redis Cluster: stopping it stops the cluster too."""

    def stop(self) -> None:
        """Stop Herald's processes, then the cluster."""
        super().stop()
        self.redis.stop()


def start_herald_cluster(workdir: Path, redis: RedisServer) -> Target:
    """One gateway and one worker, as :func:`bench.servers.start_herald`, on a 3-master Redis Cluster of their own."""
    cluster = RedisCluster(workdir).start()
    try:
        target = servers.start_herald(workdir, cluster)
    except BaseException:
        cluster.stop()
        raise
    return ClusterTarget(target.name, target.port, cluster, target.processes,
                         [*target.notes, f"Redis Cluster of {MASTERS} masters (ClusterBroker, sharded pub/sub)"])


Publish = Callable[[Sequence[tuple[str, int]]], Awaitable[None]]


async def cluster_publisher(spec: dict[str, Any], encoded: Callable[[int, int], bytes]
                            ) -> tuple[Publish, Callable[[], Awaitable[None]]]:
    """Scenario C's publisher on a cluster: per event, the ClusterBroker's publish command to its topic's master."""
    from bench.publisher import RawRedis, _pack
    from herald.broker.cluster import ClusterBroker, sharded_script
    from herald.broker.redis import _PUBLISH_LUA
    from herald.broker.slots import key_slot

    broker = ClusterBroker(spec["redis_url"])
    seeds = spec["redis_url"].removeprefix("redis+cluster://").split(",")
    first = await RawRedis.connect(f"redis://{seeds[0]}")
    [slots] = await first.execute([_pack("CLUSTER", "SLOTS")])
    await first.close()
    owners: list[tuple[int, int, str]] = [(int(s[0]), int(s[1]), f"{s[2][0].decode()}:{s[2][1]}") for s in slots]
    conns = {name: await RawRedis.connect(f"redis://{name}") for _, _, name in owners}
    for conn in conns.values():
        await conn.execute([_pack("SCRIPT", "LOAD", sharded_script(_PUBLISH_LUA))])
    by_slot: dict[int, RawRedis] = {}

    def conn_of(topic: str) -> RawRedis:
        slot = key_slot(f"herald:topic:{{{topic}}}")
        conn = by_slot.get(slot)
        if conn is None:
            conn = by_slot[slot] = conns[next(name for lo, hi, name in owners if lo <= slot <= hi)]
        return conn

    async def publish(batch: Sequence[tuple[str, int]]) -> None:
        stamp = time.time_ns()
        per_node: dict[int, tuple[RawRedis, list[bytes]]] = {}
        for topic, seq in batch:
            conn = conn_of(topic)
            per_node.setdefault(id(conn), (conn, []))[1].append(
                _pack(*broker.publish_command(topic, "bench.tick", encoded(seq, stamp))))
        replies = await asyncio.gather(*(conn.execute(commands) for conn, commands in per_node.values()))
        failed = [r for rs in replies for r in rs if isinstance(r, hiredis.ReplyError)]
        if failed:
            raise RuntimeError(f"{len(failed)} publishes failed: {failed[0]}")

    async def close() -> None:
        for conn in conns.values():
            await conn.close()
        await broker.close()

    return publish, close


def cluster_cases(selected: list[str], sizes: Any, workdir_of: Callable[[], Path]) -> list[Any]:
    """C as fast as it goes, D up to 1,000 operations/s, and S, again on Herald with a Redis Cluster of three masters.

    Kept short (about 40 s in a full run): C's paced variant and D's higher steps are the single Redis's.
    """
    import functools

    from bench.scenarios import Case, end_to_end, many_topics

    on = f"Redis Cluster, {MASTERS} masters"
    out: list[Case] = []
    if "C" in selected:
        out.append(Case("C", f"1:1 topics x{sizes.c_subscribers} (SSE), as fast as it goes, {on}",
                        lambda k, t: many_topics(k, t, n=sizes.c_subscribers, workdir=workdir_of(), transport="sse",
                                                 rounds=sizes.c_rounds, quiet=sizes.quiet_seconds),
                        start=start_herald_cluster, only="herald"))
    if "D" in selected:
        rates = tuple(r for r in sizes.d_rates if r <= 1000) or sizes.d_rates[:1]
        out.append(Case("D", f"POST->event, {sizes.d_rooms} room streams, steps {'/'.join(map(str, rates))}/s, {on}",
                        functools.partial(end_to_end, rooms=sizes.d_rooms, rates=rates,
                                          step_seconds=sizes.d_step_seconds),
                        commands=True, start=start_herald_cluster, only="herald"))
    if "S" in selected:
        from bench.saturation import saturation

        out.append(Case("S", f"{sizes.s_commands:,} commands at full speed, each to its own SSE subscriber "
                             f"({sizes.s_concurrency} connections), {on}",
                        functools.partial(saturation, n=sizes.s_commands, concurrency=sizes.s_concurrency),
                        commands=True, start=start_herald_cluster, only="herald"))
    return out
