"""A private Redis Cluster on free loopback ports, for tests that need the real thing.

``LocalCluster().start()`` runs six ``redis-server --cluster-enabled yes`` processes (each a
:class:`tests.support.redis_server.RedisServer`, so its own temporary directory and log), forms
them with ``redis-cli --cluster create ... --cluster-replicas 1`` (three masters, three
replicas) and waits until every node says ``cluster_state:ok`` and agrees on who serves every
slot. ``cluster-node-timeout`` is short (1 s), so a killed master's replica is promoted within
a few seconds; :meth:`LocalCluster.kill` takes a node away (SIGKILL), :meth:`LocalCluster.revive`
starts it again (it rejoins as a replica of whoever took its slots), and
:meth:`LocalCluster.heal` waits until the cluster is whole again. :meth:`LocalCluster.move_slot`
moves one slot, keys and all, from its master to another, as ``redis-cli --cluster reshard``
does (``CLUSTER SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``SETSLOT NODE``).

Every wait is bounded. It never touches a Redis it did not start.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import key_slot

from tests.support.redis_server import RedisServer, free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 1000
"""``cluster-node-timeout``: how long a master may be silent before its replica takes over."""


@dataclass(frozen=True, slots=True)
class Node:
    """One node as ``CLUSTER NODES`` describes it."""

    id: str
    port: int
    master: bool
    master_id: str | None
    slots: tuple[tuple[int, int], ...]
    failed: bool

    def serves(self, slot: int) -> bool:
        """Whether this node's slot ranges hold ``slot``."""
        return any(start <= slot <= end for start, end in self.slots)


class LocalCluster:
    """Six redis-server processes (three masters, three replicas) formed into one Redis Cluster."""

    def __init__(self, *, masters: int = 3, startup_timeout: float = 30.0) -> None:
        self.startup_timeout = startup_timeout
        self.servers = [RedisServer() for _ in range(2 * masters)]
        self.masters = masters

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def server(self, port: int) -> RedisServer:
        """The server listening on ``port``."""
        return next(s for s in self.servers if s.port == port)

    def _args(self, server: RedisServer) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(server.dir / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # the bus port is its own free port: port + 10000 may be taken, or past 65535
            "--cluster-port", str(free_port()),
            # a replica takes over however long it was cut off: the tests kill masters on purpose
            "--cluster-replica-validity-factor", "0",
            # the other masters keep serving while one shard is down (each test says what it expects)
            "--cluster-require-full-coverage", "no",
            # replicas sync at once (the default waits 5 s for more replicas to share a transfer)
            "--repl-diskless-sync-delay", "0",
        ]

    def start(self) -> LocalCluster:
        """Start the six servers, form the cluster and wait until it is whole."""
        try:
            for server in self.servers:
                server.start(*self._args(server))
            nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run([REDIS_CLI, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                           check=True, capture_output=True, timeout=self.startup_timeout)
            self.heal()
        except BaseException:
            self.cleanup()
            raise
        return self

    def client(self, port: int) -> redis.Redis:
        """A plain synchronous client of one node (no redirections followed)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, protocol=2)

    def cluster_client(self) -> redis.RedisCluster:
        """A synchronous cluster client, for set-up and assertions (not the code under test)."""
        alive = next(s for s in self.servers if s.running)
        return redis.RedisCluster(host="127.0.0.1", port=alive.port, socket_timeout=5, protocol=2)

    def nodes(self) -> list[Node]:
        """The cluster as one live node sees it."""
        for server in self.servers:
            if not server.running:
                continue
            try:
                with self.client(server.port) as client:
                    raw: Any = client.execute_command("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            return [_node(line) for line in text.splitlines() if line.strip()]
        raise RuntimeError("no node of the cluster answers")

    def master_of(self, key: str) -> Node:
        """The master that serves ``key``'s slot now."""
        slot = key_slot(key.encode())
        return next(n for n in self.nodes() if n.master and not n.failed and n.serves(slot))

    def heal(self, timeout: float | None = None) -> None:
        """Wait until every running node says ``cluster_state:ok``, each master of the slots has a live replica in
        sync, and all running nodes agree on the slots' owners."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        problem = "not checked yet"
        while time.monotonic() < deadline:
            problem = self._problem()
            if not problem:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster is not whole after {timeout or self.startup_timeout}s: {problem}\n"
                           + self.logs())

    def _problem(self) -> str:
        views = []
        for server in self.servers:
            if not server.running:
                return f"127.0.0.1:{server.port} is not running"
            try:
                with self.client(server.port) as client:
                    info: Any = client.execute_command("CLUSTER", "INFO")
                    raw: Any = client.execute_command("CLUSTER", "NODES")
                    role: Any = client.execute_command("ROLE")
            except redis.RedisError as exc:
                return f"127.0.0.1:{server.port}: {exc}"
            info_text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in info_text:
                return f"127.0.0.1:{server.port} is not ok yet"
            if role[0] == b"slave" and role[3] != b"connected":  # a replica still syncing cannot confirm a WAIT
                return f"127.0.0.1:{server.port} is a replica not in sync yet ({role[3]!r})"
            nodes = [_node(line) for line in (raw.decode() if isinstance(raw, bytes) else raw).splitlines()
                     if line.strip()]
            if any(n.failed for n in nodes):
                return f"127.0.0.1:{server.port} sees a failed node"
            masters = [n for n in nodes if n.master and n.slots]
            if len(masters) != self.masters:
                return f"127.0.0.1:{server.port} sees {len(masters)} masters with slots"
            if sum(end - start + 1 for m in masters for start, end in m.slots) != 16384:
                return f"127.0.0.1:{server.port} sees slots uncovered"
            for master in masters:
                if not any(n.master_id == master.id for n in nodes):
                    return f"master {master.port} has no replica yet"
            views.append(sorted((m.port, m.slots) for m in masters))
        if any(view != views[0] for view in views):
            return "the nodes do not agree on the slots yet"
        return ""

    def kill(self, port: int) -> None:
        """SIGKILL one node: it vanishes as in a crash."""
        self.server(port).kill()

    def revive(self, port: int) -> None:
        """Start a killed node again on its port and files; it rejoins the cluster (as a replica if it lost its
        slots meanwhile)."""
        server = self.server(port)
        server.start(*self._args(server))

    def wait_promoted(self, port: int, timeout: float = 15.0) -> Node:
        """Wait until the slots of the (dead) master on ``port`` are served by another master; that master."""
        before = next(n for n in self.nodes() if n.port == port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes():
                if node.master and not node.failed and node.port != port and node.slots == before.slots:
                    return node
            time.sleep(0.05)
        raise RuntimeError(f"no replica took over from 127.0.0.1:{port} within {timeout}s\n" + self.logs())

    def move_slot(self, slot: int, to_port: int, *, batch: int = 100, pause: float = 0.0) -> None:
        """Move ``slot`` with its keys to the master on ``to_port``, the way ``redis-cli --cluster reshard`` does.

        ``pause``: seconds to hold the slot half moved, before its keys move and again after (while clients are
        redirected with ``ASK``), so a test's load runs through every stage of the move.
        """
        nodes = self.nodes()
        source = next(n for n in nodes if n.master and n.serves(slot))
        target = next(n for n in nodes if n.port == to_port)
        if source.port == target.port:
            return
        with self.client(source.port) as src, self.client(target.port) as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target.id)
            time.sleep(pause)
            while True:
                keys: Any = src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            time.sleep(pause)
            # the new owner first, then the old one, then the others (as redis-cli does)
            others = [n for n in nodes if n.master and not n.failed and n.port not in (source.port, target.port)]
            for node in (target, source, *others):
                with self.client(node.port) as client:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", target.id)
        self.heal(10)

    def flush(self) -> None:
        """Empty every master (``FLUSHALL``), so a test starts from nothing."""
        for node in self.nodes():
            if node.master and not node.failed:
                with self.client(node.port) as client:
                    client.flushall()

    def logs(self, lines: int = 10) -> str:
        """The end of every node's log."""
        return "\n".join(f"--- redis :{s.port}\n{s.log_tail(lines)}" for s in self.servers)

    def cleanup(self) -> None:
        """Stop every node and remove their directories."""
        for server in self.servers:
            server.cleanup()

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.servers)


def _node(line: str) -> Node:
    """One line of ``CLUSTER NODES``: ``<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...``."""
    parts = line.split()
    port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
    flags = parts[2].split(",")
    slots = []
    for spec in parts[8:]:
        if spec.startswith("["):
            continue  # a slot being migrated or imported: still served by this line's owner
        start, _, end = spec.partition("-")
        slots.append((int(start), int(end or start)))
    return Node(id=parts[0], port=port, master="master" in flags, master_id=None if parts[3] == "-" else parts[3],
                slots=tuple(sorted(slots)), failed="fail" in flags or "fail?" in flags)
