"""The worker's limits and grace: ``worker_options`` decides them, and the embedded worker honours the settings.

``worker_options(settings, spec, **overrides)``: an override wins, then the settings class, then
``Settings``. The embedded worker that ``create_app`` starts is observed from outside, through what
its handlers see: how many run at once (concurrency), how often a retried request runs
(max attempts), and how long a stopping app lets a running job go on before cancelling it (grace).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from herald import Context, Domain, Retry, Settings, WorkerSettings
from herald.worker import Handler, worker_options
from tests.herald.http.harness import Herald, in_process, wait_until


def test_options_come_from_the_settings_by_default() -> None:
    settings = Settings(worker_concurrency=3, max_attempts=2, worker_grace=1.5)
    assert worker_options(settings) == {"concurrency": 3, "max_attempts": 2, "shutdown_grace": 1.5}


def test_a_settings_class_overrides_the_settings_and_an_override_overrides_both() -> None:
    class Spec(WorkerSettings):
        concurrency = 5
        shutdown_grace = 4.0

    settings = Settings(worker_concurrency=3, max_attempts=2, worker_grace=1.5)
    assert worker_options(settings, Spec) == {"concurrency": 5, "max_attempts": 2, "shutdown_grace": 4.0}
    assert worker_options(settings, Spec, concurrency=7, max_attempts=9) == {
        "concurrency": 7, "max_attempts": 9, "shutdown_grace": 4.0}


def test_an_override_of_none_leaves_the_option_to_the_spec_or_settings() -> None:
    # `herald worker` passes --concurrency as None when it was not given
    class Spec(WorkerSettings):
        max_attempts = 4

    settings = Settings(worker_concurrency=3, max_attempts=2, worker_grace=1.5)
    assert worker_options(settings, Spec, concurrency=None, max_attempts=None) == {
        "concurrency": 3, "max_attempts": 4, "shutdown_grace": 1.5}


def jobs(handler: Handler) -> Domain:
    """A one-command domain: ``POST /jobs`` → ``JobRequested``, handled by ``handler``."""
    domain = Domain("jobs")
    domain.command("POST", "/jobs", event="JobRequested")(lambda params, body: body)
    domain.handler("JobRequested")(handler)
    return domain


async def submit(herald: Herald, n: int) -> list[str]:
    """``n`` jobs; their operation ids."""
    ids = []
    for i in range(n):
        response = await herald.client.post("/jobs", json={"n": i})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


@pytest.fixture
def limits() -> dict[str, Any]:
    """Settings whose worker options differ from every default (8 at once, 5 attempts, 10 s grace)."""
    return {"worker_concurrency": 3, "max_attempts": 2, "worker_grace": 0.3}


async def test_the_embedded_worker_runs_as_many_jobs_at_once_as_the_settings_say(limits: dict[str, Any]) -> None:
    running: set[int] = set()
    most = 0
    go_on = asyncio.Event()

    async def handler(ctx: Context) -> None:
        nonlocal most
        running.add(ctx.data["n"])
        most = max(most, len(running))
        await go_on.wait()
        running.discard(ctx.data["n"])

    async with in_process(domains=[jobs(handler)], **limits) as herald:
        ids = await submit(herald, 6)
        await wait_until(lambda: len(running) == 3)
        await asyncio.sleep(0.3)  # a worker with a higher concurrency would have taken more by now
        assert most == 3
        go_on.set()
        for op_id in ids:
            await herald.wait_status(op_id, "succeeded")
    assert most == 3


async def test_the_embedded_worker_gives_up_after_the_attempts_the_settings_say(limits: dict[str, Any]) -> None:
    runs: list[int] = []

    async def handler(ctx: Context) -> None:
        runs.append(ctx.operation.attempts)
        raise Retry()

    async with in_process(domains=[jobs(handler)], visibility_timeout=0.2, **limits) as herald:
        [op_id] = await submit(herald, 1)
        doc = await herald.wait_status(op_id, "failed")
    assert runs == [1, 2]
    assert doc["error"]["type"] == "https://herald.dev/problems/attempts-exhausted"
    assert doc["error"]["attempts"] == 2


async def test_a_stopping_app_gives_running_jobs_the_grace_the_settings_say(limits: dict[str, Any]) -> None:
    started = asyncio.Event()
    cancelled_after: list[float] = []
    stop_began = 0.0

    async def handler(ctx: Context) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled_after.append(time.monotonic() - stop_began)
            raise

    async with in_process(domains=[jobs(handler)], **limits) as herald:
        await submit(herald, 1)
        await asyncio.wait_for(started.wait(), 5)
        stop_began = time.monotonic()
    assert len(cancelled_after) == 1
    assert 0.25 <= cancelled_after[0] < 1.0, f"cancelled {cancelled_after[0]:.2f} s after the stop, grace is 0.3 s"
