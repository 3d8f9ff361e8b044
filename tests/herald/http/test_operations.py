"""``GET`` / ``DELETE /operations/{id}``: ETag and 304, Retry-After, long poll, 303, cancel, 404."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from herald.operations import Status
from herald.worker import Context, Worker
from tests.herald.http.harness import Herald, assert_problem

FIELDS = {"id", "type", "status", "created_at", "updated_at", "events_url", "result", "error", "operation_url"}


async def pending_operation(herald: Herald) -> str:
    """The id of a new operation that no worker will touch."""
    response = await herald.send()
    assert response.status_code == 202
    op_id: str = response.json()["id"]
    return op_id


async def test_get_a_pending_operation(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    response = await idle_herald.client.get(f"/operations/{op_id}")
    assert response.status_code == 200
    body = response.json()
    assert FIELDS <= set(body)
    assert body["id"] == op_id
    assert body["status"] == "pending"
    assert body["type"] == "ChatMessageSent"
    assert body["result"] is None and body["error"] is None
    assert body["events_url"].startswith(f"/operations/{op_id}/events?token=")
    assert response.headers["retry-after"] == "1"
    assert response.headers["etag"] == f'"{op_id}.1"'
    assert response.headers["cache-control"] == "no-cache"


async def test_if_none_match_gets_304_until_the_operation_changes(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    etag = (await idle_herald.client.get(f"/operations/{op_id}")).headers["etag"]
    not_modified = await idle_herald.client.get(f"/operations/{op_id}", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert not_modified.headers["retry-after"] == "1"
    await idle_herald.broker.transition(op_id, Status.RUNNING)
    changed = await idle_herald.client.get(f"/operations/{op_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "running"
    assert changed.headers["etag"] != etag


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"other.1", {etag}', '"other.1",W/{etag}', "*"])
async def test_if_none_match_takes_lists_weak_tags_and_star(idle_herald: Herald, form: str) -> None:
    op_id = await pending_operation(idle_herald)
    etag = (await idle_herald.client.get(f"/operations/{op_id}")).headers["etag"]
    header = form.format(etag=etag)
    assert (await idle_herald.client.get(f"/operations/{op_id}", headers={"If-None-Match": header})).status_code == 304
    if form == "*":
        return  # "*" matches whatever the operation becomes
    # and a long poll with it waits for a change instead of answering at once
    poll = asyncio.ensure_future(idle_herald.client.get(f"/operations/{op_id}", params={"wait": "20"},
                                                        headers={"If-None-Match": header}))
    await asyncio.sleep(0.1)
    assert not poll.done()
    await idle_herald.broker.transition(op_id, Status.RUNNING)
    assert (await asyncio.wait_for(poll, 5)).json()["status"] == "running"


async def test_a_stale_if_none_match_gets_the_document(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    response = await idle_herald.client.get(f"/operations/{op_id}", headers={"If-None-Match": '"other.1"'})
    assert response.status_code == 200


async def test_long_poll_answers_as_soon_as_the_status_changes(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    poll = asyncio.ensure_future(idle_herald.client.get(f"/operations/{op_id}", params={"wait": "20"}))
    await asyncio.sleep(0.1)
    assert not poll.done()  # it really waits
    await idle_herald.broker.transition(op_id, Status.RUNNING)
    response = await asyncio.wait_for(poll, 5)  # far less than the 20 s it asked for
    assert response.status_code == 200
    assert response.json()["status"] == "running"
    assert response.headers["retry-after"] == "1"


async def test_long_poll_with_a_current_etag_waits_for_the_next_change(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    etag = (await idle_herald.client.get(f"/operations/{op_id}")).headers["etag"]
    poll = asyncio.ensure_future(idle_herald.client.get(f"/operations/{op_id}", params={"wait": "20"},
                                                        headers={"If-None-Match": etag}))
    await asyncio.sleep(0.1)
    assert not poll.done()
    await idle_herald.broker.request_cancel(op_id)  # a change without a status event
    await idle_herald.broker.transition(op_id, Status.CANCELED)
    response = await asyncio.wait_for(poll, 5)
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"


async def test_long_poll_times_out_with_the_unchanged_operation(
    make_herald: Callable[..., Awaitable[Herald]],
) -> None:
    herald = await make_herald(embedded_worker=False, max_wait=0.3)
    op_id = await pending_operation(herald)
    response = await herald.client.get(f"/operations/{op_id}", params={"wait": "30"})  # capped to 0.3 s
    assert response.status_code == 200
    assert response.json()["status"] == "pending"


async def test_long_poll_on_a_terminal_operation_answers_at_once(herald: Herald) -> None:
    op_id = (await herald.send(headers={"Prefer": "wait=5"})).json()["id"]
    response = await asyncio.wait_for(
        herald.client.get(f"/operations/{op_id}", params={"wait": "20", "view": "status"}), 5
    )
    assert response.json()["status"] == "succeeded"


@pytest.mark.parametrize("wait", ["soon", "-1", "nan", "inf", ""])
async def test_a_bad_wait_is_400(idle_herald: Herald, wait: str) -> None:
    op_id = await pending_operation(idle_herald)
    assert_problem(await idle_herald.client.get(f"/operations/{op_id}", params={"wait": wait}), 400, "bad-wait")


async def test_a_succeeded_operation_redirects_303_to_what_it_created(herald: Herald) -> None:
    op_id = (await herald.send(text="see other")).json()["id"]
    await herald.wait_status(op_id, "succeeded")
    response = await herald.client.get(f"/operations/{op_id}")
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("/chats/lobby/messages/m_")
    assert response.json()["status"] == "succeeded"  # the body still describes the operation
    assert "retry-after" not in response.headers
    message = await herald.client.get(location)
    assert message.status_code == 200
    assert message.json()["text"] == "see other"
    followed = await herald.client.get(f"/operations/{op_id}", follow_redirects=True)
    assert followed.status_code == 200
    assert followed.json()["id"] == location.rsplit("/", 1)[1]


async def test_view_status_always_shows_the_operation(herald: Herald) -> None:
    op_id = (await herald.send()).json()["id"]
    doc = await herald.wait_status(op_id, "succeeded")
    response = await herald.client.get(f"/operations/{op_id}", params={"view": "status"})
    assert response.status_code == 200
    assert "location" not in response.headers
    assert response.json() == doc
    assert doc["location"].startswith("/chats/lobby/messages/m_")


async def test_an_unknown_view_is_400(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    assert_problem(await idle_herald.client.get(f"/operations/{op_id}", params={"view": "full"}), 400, "bad-view")


@pytest.mark.parametrize("op_id", ["op_doesnotexist0000000000", "x" * 65, "op_bad%20id", "op_%0A", "op_a.b"])
async def test_an_unknown_or_malformed_id_is_404(idle_herald: Herald, op_id: str) -> None:
    assert_problem(await idle_herald.client.get(f"/operations/{op_id}"), 404, "operation-not-found")
    assert_problem(await idle_herald.client.delete(f"/operations/{op_id}"), 404, "operation-not-found")


async def test_an_expired_operation_is_404(make_herald: Callable[..., Awaitable[Herald]]) -> None:
    herald = await make_herald(embedded_worker=False, operation_ttl=1)
    op_id = await pending_operation(herald)
    herald.broker.sweep(now=time.monotonic() + 3600)  # type: ignore[attr-defined]
    assert_problem(await herald.client.get(f"/operations/{op_id}"), 404, "operation-not-found")


# Cancel -------------------------------------------------------------------------------------------


async def test_delete_asks_to_cancel_and_a_worker_ends_it_canceled(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    response = await idle_herald.client.delete(f"/operations/{op_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    assert response.json()["cancel_requested"] is True
    assert response.headers["retry-after"] == "1"
    assert response.headers["etag"] == f'"{op_id}.2"'
    ran: list[str] = []

    async def handler(ctx: Context) -> None:
        ran.append(ctx.operation_id)

    await asyncio.wait_for(Worker(idle_herald.broker, {"ChatMessageSent": handler}, poll=0.05).run(burst=True), 5)
    doc = await idle_herald.wait_status(op_id, "canceled")
    assert ran == []  # canceled without running
    assert doc["error"]["type"].endswith("/canceled")
    assert "cancel_requested" not in doc


async def test_a_running_handler_sees_the_cancel_and_ends_canceled(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    started, proceed = asyncio.Event(), asyncio.Event()

    async def slow(ctx: Context) -> None:
        started.set()
        await asyncio.wait_for(proceed.wait(), 5)
        if await ctx.cancel_requested():
            await ctx.canceled()
            return
        await ctx.succeed("done")

    worker = asyncio.ensure_future(Worker(idle_herald.broker, {"ChatMessageSent": slow}, poll=0.05).run(burst=True))
    await asyncio.wait_for(started.wait(), 5)
    assert (await idle_herald.client.get(f"/operations/{op_id}")).json()["status"] == "running"
    assert (await idle_herald.client.delete(f"/operations/{op_id}")).status_code == 202
    proceed.set()
    await asyncio.wait_for(worker, 5)
    assert (await idle_herald.wait_status(op_id, "canceled"))["status"] == "canceled"


async def test_delete_twice_is_still_202(idle_herald: Herald) -> None:
    op_id = await pending_operation(idle_herald)
    assert (await idle_herald.client.delete(f"/operations/{op_id}")).status_code == 202
    again = await idle_herald.client.delete(f"/operations/{op_id}")
    assert again.status_code == 202
    assert again.headers["etag"] == f'"{op_id}.2"'  # nothing changed the second time


@pytest.mark.parametrize("final", [Status.SUCCEEDED, Status.FAILED, Status.CANCELED])
async def test_delete_of_a_terminal_operation_is_409(idle_herald: Herald, final: Status) -> None:
    op_id = await pending_operation(idle_herald)
    await idle_herald.broker.transition(op_id, final)
    doc = assert_problem(await idle_herald.client.delete(f"/operations/{op_id}"), 409, "operation-ended")
    assert doc["status_now"] == final.value
    after = await idle_herald.client.get(f"/operations/{op_id}", params={"view": "status"})
    assert after.json()["status"] == final.value  # terminal never changes
