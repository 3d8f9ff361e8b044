"""The worker's leases: extended while a job runs, and "lost" reported only for a job that really was taken.

A worker re-claims the jobs in hand every third of the visibility timeout; the broker answers with the
ones that are no longer this worker's, and the worker warns about those ("another may run it too").
A job the worker has acknowledged itself is not lost, however the acknowledgement and the lease
check interleave; a job another consumer took is.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Iterator

import pytest

from herald.broker import create_broker
from herald.broker.base import Broker, Delivery
from herald.worker import Context, Retry, Worker
from tests.herald.broker.helpers import REQUEST, command, eventually

VISIBILITY = 0.15
"""Short, so the worker extends its leases every 50 ms and a lease check meets many acknowledgements."""
LOST = "no longer this worker's"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A started broker of either kind with a short visibility timeout."""
    url = "memory://" if request.param == "memory" else str(request.getfixturevalue("redis_url"))
    made = create_broker(url, visibility_timeout=VISIBILITY)
    await made.start()
    yield made
    await made.close()


class Records(logging.Handler):
    """Keeps the records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lost(self) -> list[str]:
        """The "job … is no longer this worker's" warnings."""
        return [r.getMessage() for r in self.records if LOST in r.getMessage()]


@pytest.fixture
def worker_log() -> Iterator[Records]:
    """The records of logger ``herald.worker`` (attached to it directly: ``configure_logging`` stops propagation)."""
    logger = logging.getLogger("herald.worker")
    records = Records()
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


async def queue(broker: Broker, n: int) -> list[str]:
    """Accept ``n`` commands of type ``REQUEST``; their operation ids."""
    ids = []
    for i in range(n):
        op, request = command(i=i)
        await broker.accept(op, request)
        ids.append(op.id)
    return ids


async def assert_succeeded(broker: Broker, ids: list[str]) -> None:
    """Every operation of ``ids`` succeeded."""
    for op_id in ids:
        operation = await broker.get_operation(op_id)
        assert operation is not None and operation.status == "succeeded", operation


async def test_many_quick_jobs_finished_by_the_worker_are_never_reported_lost(
    broker: Broker, worker_log: Records
) -> None:
    ids = await queue(broker, 400)

    async def handler(ctx: Context) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))
        await ctx.succeed({"ok": True})

    worker = Worker(broker, {REQUEST: handler}, poll=0.05, concurrency=8)
    await asyncio.wait_for(worker.run(burst=True), 30)
    assert worker.handled == len(ids)
    await assert_succeeded(broker, ids)
    assert worker_log.lost() == []


async def test_a_job_that_works_on_after_ending_its_operation_is_not_reported_lost(
    broker: Broker, worker_log: Records
) -> None:
    # ending the operation acknowledges the request; the handler may still publish (emit) or clean up
    # afterwards, for longer than a lease period, and the job is still this worker's own business
    ids = await queue(broker, 3)

    async def handler(ctx: Context) -> None:
        await ctx.succeed({"ok": True})
        await asyncio.sleep(VISIBILITY)  # three lease checks
        await ctx.emit("ThingAnnounced", {"after": "the end"})

    worker = Worker(broker, {REQUEST: handler}, poll=0.05, concurrency=3)
    await asyncio.wait_for(worker.run(burst=True), 10)
    await assert_succeeded(broker, ids)
    assert worker_log.lost() == []


async def test_a_retried_job_waiting_out_its_defer_is_still_extended(broker: Broker, worker_log: Records) -> None:
    # Retry(defer) keeps the job until the defer is over: its lease is kept, so nobody else takes it meanwhile
    [op_id] = await queue(broker, 1)
    runs: list[int] = []

    async def handler(ctx: Context) -> None:
        runs.append(ctx.operation.attempts)
        if len(runs) == 1:
            raise Retry(defer=VISIBILITY * 3)
        await ctx.succeed()

    worker = Worker(broker, {REQUEST: handler}, poll=0.05, concurrency=1)
    task = asyncio.create_task(worker.run(burst=True))
    await asyncio.sleep(VISIBILITY * 2)
    assert await broker.consume([REQUEST], "someone-else", block=0) == []  # still leased while deferred
    await asyncio.wait_for(task, 10)
    assert len(runs) == 2
    await assert_succeeded(broker, [op_id])
    assert worker_log.lost() == []


async def test_a_job_another_consumer_took_is_reported_lost(broker: Broker, worker_log: Records) -> None:
    [op_id] = await queue(broker, 1)
    held: list[Delivery] = []
    go_on = asyncio.Event()

    async def handler(ctx: Context) -> None:
        assert ctx.delivery is not None
        held.append(ctx.delivery)
        await go_on.wait()
        await ctx.succeed()

    worker = Worker(broker, {REQUEST: handler}, poll=0.05, concurrency=1)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: bool(held))
        # the lease is taken away behind the worker's back: given back and handed to another consumer
        await broker.release(held[0])
        [taken] = await broker.consume([REQUEST], "thief", block=1)
        assert taken.event.id == held[0].event.id
        await eventually(lambda: bool(worker_log.lost()))
        assert worker_log.lost()[0] == f"job {held[0].delivery_id} is no longer this worker's; another may run it too"
    finally:
        go_on.set()
        worker.stop()
        await asyncio.wait_for(task, 5)
    await assert_succeeded(broker, [op_id])
