"""What the command proxy needs of the worker: handlers bound to a run, their own attempt limit, and hand-off.

A :class:`~herald.worker.Bindable` handler is bound once per worker run, with the worker's settings,
and what it pushes on the run's stack is closed when the run ends; a bound handler's ``max_attempts``
replaces the worker's; :meth:`Context.hand_off` acknowledges the request and leaves the operation running.
"""

from __future__ import annotations

import asyncio
from typing import Any

from herald import Context, Retry, Settings, Worker
from herald.broker import create_broker
from herald.broker.base import Broker
from herald.events import build_event
from herald.operations import Operation, new_operation_id
from herald.worker import WorkerRun
from tests.support.server import TEST_SECRET

SETTINGS = Settings(secret=TEST_SECRET, max_attempts=5)


async def accepted(broker: Broker) -> str:
    """Accept one ``ThingRequested`` operation; its id."""
    op_id = new_operation_id()
    request = build_event("ThingRequested", {"n": 1}, source="herald/things", correlationid=op_id)
    await broker.accept(Operation(id=op_id, type="ThingRequested", request_event_id=request.id), request)
    return op_id


class Counting:
    """A bindable handler that records its binds and closes, and retries until ``limit`` attempts."""

    def __init__(self, limit: int | None = None) -> None:
        self.bound: list[Settings] = []
        self.closed = 0
        self.limit = limit
        self.attempts: list[int] = []

    async def __call__(self, ctx: Context) -> None:
        raise AssertionError("a bindable handler runs bound")

    def bind(self, run: WorkerRun) -> Any:
        self.bound.append(run.settings)

        async def close() -> None:
            self.closed += 1

        run.stack.push_async_callback(close)
        outer = self

        class Bound:
            max_attempts = outer.limit

            async def __call__(self, ctx: Context) -> None:
                outer.attempts.append(ctx.operation.attempts)
                raise Retry()

        return Bound()


async def test_a_bindable_handler_is_bound_once_per_run_with_the_workers_settings_and_closed_after() -> None:
    broker = create_broker(None, visibility_timeout=0.2)
    await broker.start()
    handler = Counting(limit=2)
    op_id = await accepted(broker)
    worker = Worker(broker, {"ThingRequested": handler}, poll=0.05, settings=SETTINGS)
    await asyncio.wait_for(worker.run(burst=True), 10)
    assert handler.bound == [SETTINGS] and handler.closed == 1
    # its own limit of 2 attempts, not the worker's 5
    assert handler.attempts == [1, 2]
    op = await broker.get_operation(op_id)
    assert op is not None and op.status.value == "failed"
    assert op.error is not None and op.error["type"].endswith("/attempts-exhausted")
    await broker.close()


async def test_hand_off_acknowledges_the_request_and_leaves_the_operation_running() -> None:
    broker = create_broker(None, visibility_timeout=0.2)
    await broker.start()
    op_id = await accepted(broker)
    runs: list[str] = []

    async def handler(ctx: Context) -> None:
        runs.append(ctx.operation_id)
        ctx.stage("ThingForwarded", {"to": "elsewhere"})
        await ctx.hand_off()

    worker = Worker(broker, {"ThingRequested": handler}, poll=0.05)
    await asyncio.wait_for(worker.run(burst=True), 10)
    await asyncio.sleep(0.4)  # past the visibility timeout: an unacknowledged request would come back
    await asyncio.wait_for(Worker(broker, {"ThingRequested": handler}, poll=0.05).run(burst=True), 10)
    assert runs == [op_id]
    op = await broker.get_operation(op_id)
    assert op is not None and op.status.value == "running"
    types = [s.event.type for s in (await broker.read(f"operations/{op_id}", None)).events]
    assert types == ["herald.operation.running", "ThingForwarded"]
    await broker.close()
