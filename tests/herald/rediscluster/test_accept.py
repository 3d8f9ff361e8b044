"""Accepting a command touches two slots (the request's shard, the operation's): a node killed between the halves.

The accept queues the request first, then stores the operation (herald.broker.cluster). These
tests SIGKILL the master of one half at the moment the accept reaches it, and show that no
command is answered ``202`` without being run, and that nothing stays ``pending`` for good:

* the operation's master dies after the request was queued: the accept fails (the client would
  get ``503``); the worker that takes the request creates the operation from the record the
  request carries (once the accept can no longer do it) and runs it; the client's retry with the
  same ``Idempotency-Key`` gets that operation, not a second one;
* the same, but the retry comes after the reservation is old and before any worker ran: the
  retry takes the key over, and the first request, found superseded, is dropped unrun;
* the request shard's master dies before the request could be sent: nothing is queued (or, when the
  connection the request went out on was open already, the operation is stored as not accepted),
  the key is freed, and the retry is accepted at once (after the failover) and runs once;
* with ``wait_replicas=1``, the operation's master has lost its replica: the accept is undone (the
  operation stored as failed, the key freed) so the ``503`` stands for work not done, the worker
  drops the request, and the next commands for that shard are refused before anything is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from herald.broker.base import BrokerUnavailable, IdempotencyInProgress
from herald.broker.cluster import ClusterBroker
from herald.broker.slots import key_slot
from herald.operations import Status
from tests.herald.broker.helpers import REQUEST, command
from tests.support.redis_cluster import LocalCluster

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

TIMEOUT = 0.5  # socket timeout: the accept gives up on a dead master within it (a failover takes longer here)


@pytest.fixture
async def brokers(redis_cluster_url: str, redis_cluster: LocalCluster) -> AsyncIterator[Callable[..., ClusterBroker]]:
    """Started cluster brokers of this process; closed after the test, and the cluster left whole."""
    made: list[ClusterBroker] = []

    async def make(**options: Any) -> ClusterBroker:
        broker = ClusterBroker(redis_cluster_url, **{"socket_timeout": TIMEOUT, "visibility_timeout": 30,
                                                     **options})
        await broker.start()
        made.append(broker)
        return broker

    yield make  # type: ignore[misc]
    for broker in made:
        await broker.close()
    for server in redis_cluster.servers:
        if not server.running:
            await asyncio.to_thread(redis_cluster.revive, server.port)
    await asyncio.to_thread(redis_cluster.heal)


def on_other_master(cluster: LocalCluster, broker: ClusterBroker, key: str) -> str:
    """A request stream of the test's event type whose master is not the one serving ``key``."""
    owner = cluster.master_of(key).port
    return next(s for s in broker.shard_keys(REQUEST) if cluster.master_of(s).port != owner)


def stream_on_other_master(cluster: LocalCluster, broker: ClusterBroker, key: str) -> Callable[..., Any]:
    """A stand-in for the broker's choice of request shard: always the one :func:`on_other_master` names."""
    stream = on_other_master(cluster, broker, key)

    async def choose(_type: str, _slot: int) -> str:
        return stream

    return choose


def kill_when(broker: ClusterBroker, cluster: LocalCluster, *, script: Any = None, xadd: bool = False) -> list[int]:
    """SIGKILL the master a call goes to just before it is sent: the first run of ``script``, or the first XADD.
    The killed ports are listed as they die."""
    killed: list[int] = []
    calls = broker.calls
    run, execute_script = calls.run, calls.execute_script

    async def kill(key: Any) -> None:
        if not killed:
            name = key.decode() if isinstance(key, bytes) else str(key)
            port = cluster.master_of(name).port
            killed.append(port)
            with cluster.client(port) as client:  # what was written there before is on its replica (WAIT counts
                tag = name[name.index("{"):name.index("}") + 1]  # from this client's own last write, in the
                client.set(f"herald:test:{tag}", 1)  # slot): a kill at this point, not a race with replication
                client.execute_command("WAIT", 1, 1000)
            await asyncio.to_thread(cluster.kill, port)

    async def run_then(key: Any, commands: Any, **options: Any) -> list[Any]:
        if xadd and commands[0][0] == "XADD":
            await kill(key)
        return await run(key, commands, **options)

    async def script_then(s: Any, keys: Any, args: Any, **options: Any) -> Any:
        if s is script:
            await kill(keys[0])
        return await execute_script(s, keys, args, **options)

    calls.run = run_then  # type: ignore[method-assign]
    calls.execute_script = script_then  # type: ignore[method-assign]
    return killed


async def finish(worker: ClusterBroker) -> list[str]:
    """Take every request queued and run each as a worker does (read, running, succeeded); the ids of those it ran
    (a request whose operation is gone for good is acknowledged unrun)."""
    ran = []
    while True:
        try:
            deliveries = await worker.consume([REQUEST], "worker", count=4, block=1)
        except BrokerUnavailable:  # its view of the cluster from before a failover: it looks again, as a worker does
            await asyncio.sleep(0.2)
            continue
        if not deliveries:
            return ran
        for delivery in deliveries:
            op_id = delivery.event.correlationid or ""
            operation = await worker.get_operation(op_id)
            if operation is None or operation.status.terminal:
                await worker.ack(delivery)
                continue
            running = await worker.transition(op_id, Status.RUNNING, current=operation)
            await worker.transition(op_id, Status.SUCCEEDED, current=running, ack=delivery)
            ran.append(op_id)


async def test_the_operations_master_dying_after_the_request_is_queued_loses_nothing_and_duplicates_nothing(
    brokers: Callable[..., Any], redis_cluster: LocalCluster
) -> None:
    gateway, worker = await brokers(), await brokers()
    first, request = command(op_id=gateway.operation_id("k-op-dies"))
    op_key = f"herald:op:{{operations/{first.id}}}"
    gateway._request_stream = stream_on_other_master(redis_cluster, gateway, op_key)
    killed = kill_when(gateway, redis_cluster, script=gateway._create_script)
    with pytest.raises(BrokerUnavailable):  # the client gets 503: the operation could not be stored
        await gateway.accept(first, request, idempotency_key="k-op-dies", fingerprint="f")
    assert killed
    await asyncio.to_thread(redis_cluster.wait_promoted, killed[0])
    # the worker creates the operation from its queued request (once the accept can no longer) and runs it
    assert await finish(worker) == [first.id]
    stored = await gateway.get_operation(first.id)
    assert stored is not None and stored.status is Status.SUCCEEDED
    retry, retry_request = command(op_id=gateway.operation_id("k-op-dies"))
    again = await gateway.accept(retry, retry_request, idempotency_key="k-op-dies", fingerprint="f")
    assert (again.created, again.operation.id, again.operation.status) == (False, first.id, Status.SUCCEEDED)
    assert await gateway.get_operation(retry.id) is None
    assert await worker.consume([REQUEST], "worker", block=0.3) == []  # nothing else was ever queued


async def test_a_retry_that_takes_an_old_reservation_over_leaves_the_first_request_to_be_dropped_unrun(
    brokers: Callable[..., Any], redis_cluster: LocalCluster
) -> None:
    gateway, worker = await brokers(accept_grace=6.0), await brokers()
    first, request = command(op_id=gateway.operation_id("k-takeover"))
    op_key = f"herald:op:{{operations/{first.id}}}"
    gateway._request_stream = stream_on_other_master(redis_cluster, gateway, op_key)
    killed = kill_when(gateway, redis_cluster, script=gateway._create_script)
    with pytest.raises(BrokerUnavailable):
        await gateway.accept(first, request, idempotency_key="k-takeover", fingerprint="f")
    reserved_at = asyncio.get_running_loop().time()
    await asyncio.to_thread(redis_cluster.wait_promoted, killed[0])
    retry, retry_request = command(op_id=gateway.operation_id("k-takeover"))
    with pytest.raises(IdempotencyInProgress):  # 409: the first may yet be on its way
        await gateway.accept(retry, retry_request, idempotency_key="k-takeover", fingerprint="f")
    # no worker ran meanwhile: once the reservation is older than any accept takes, the retry takes it over
    await asyncio.sleep(max(0.0, reserved_at + 6.2 - asyncio.get_running_loop().time()))
    taken = await gateway.accept(retry, retry_request, idempotency_key="k-takeover", fingerprint="f")
    assert (taken.created, taken.operation.id) == (True, retry.id)
    assert await finish(worker) == [retry.id]  # the first request is found superseded: dropped unrun
    assert await gateway.get_operation(first.id) is None
    stored = await gateway.get_operation(retry.id)
    assert stored is not None and stored.status is Status.SUCCEEDED
    assert await worker.consume([REQUEST], "worker", block=0.3) == []


async def test_the_request_shards_master_dying_before_the_request_is_sent_queues_nothing_and_frees_the_key(
    brokers: Callable[..., Any], redis_cluster: LocalCluster
) -> None:
    gateway, worker = await brokers(), await brokers()
    first, request = command(op_id=gateway.operation_id("k-shard-dies"))
    op_key = f"herald:op:{{operations/{first.id}}}"
    gateway._request_stream = stream_on_other_master(redis_cluster, gateway, op_key)
    killed = kill_when(gateway, redis_cluster, xadd=True)
    with pytest.raises(BrokerUnavailable):
        await gateway.accept(first, request, idempotency_key="k-shard-dies", fingerprint="f")
    await asyncio.to_thread(redis_cluster.wait_promoted, killed[0])
    retry, retry_request = command(op_id=gateway.operation_id("k-shard-dies"))
    accepted = await gateway.accept(retry, retry_request, idempotency_key="k-shard-dies", fingerprint="f")
    assert (accepted.created, accepted.operation.id) == (True, retry.id)  # the key was free at once
    assert await finish(worker) == [retry.id]
    # never stored, or (when the broken connection had been open, so the request may have gone out) stored as
    # not accepted: either way it never runs
    never = await gateway.get_operation(first.id)
    assert never is None or (never.status is Status.FAILED and never.attempts == 0)
    assert await worker.consume([REQUEST], "worker", block=0.3) == []


async def test_an_accept_whose_operation_no_replica_holds_is_undone_and_the_shard_then_refused_up_front(
    brokers: Callable[..., Any], redis_cluster: LocalCluster
) -> None:
    gateway = await brokers(wait_replicas=1, wait_timeout=1.0)  # a loaded machine may take 0.2 s to confirm
    worker = await brokers()
    first, request = command(op_id=gateway.operation_id("k-lonely"))
    op_key = f"herald:op:{{operations/{first.id}}}"
    gateway._request_stream = stream_on_other_master(redis_cluster, gateway, op_key)
    master = redis_cluster.master_of(op_key)
    replica = next(n for n in redis_cluster.nodes() if n.master_id == master.id)
    await asyncio.to_thread(redis_cluster.kill, replica.port)
    with pytest.raises(BrokerUnavailable, match="replicas"):
        await gateway.accept(first, request, idempotency_key="k-lonely", fingerprint="f")
    voided = await gateway.get_operation(first.id)
    assert voided is not None and voided.status is Status.FAILED
    assert voided.error is not None and voided.error["type"].endswith("/not-accepted")
    assert await finish(worker) == []  # its request was queued, and is dropped unrun
    assert await worker.consume([REQUEST], "worker", block=0.3) == []
    # the key is free, and the shard is now known to lack its replica: refused before anything is written
    del gateway._request_stream
    retry, retry_request = command(op_id=gateway.operation_id("k-lonely"))
    assert key_slot(f"herald:op:{{operations/{retry.id}}}") == key_slot(op_key)
    with pytest.raises(BrokerUnavailable, match="fewer replicas"):
        await gateway.accept(retry, retry_request, idempotency_key="k-lonely", fingerprint="f")
    assert await gateway.get_operation(retry.id) is None
    # commands without a key are given ids on the masters that have their replicas, and go through
    for _ in range(5):
        plain, plain_request = command(op_id=gateway.operation_id())
        assert redis_cluster.master_of(f"herald:op:{{operations/{plain.id}}}").port != master.port
        assert (await gateway.accept(plain, plain_request)).created
    await asyncio.to_thread(redis_cluster.revive, replica.port)
    await asyncio.to_thread(redis_cluster.heal)
    for _ in range(50):  # the replica back and in sync: the gateway, asking again, lets the command through
        try:
            assert (await gateway.accept(retry, retry_request, idempotency_key="k-lonely", fingerprint="f")).created
            break
        except BrokerUnavailable:
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("the shard was still refused once its replica was back")
