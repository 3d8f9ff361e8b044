"""Server-Sent Events: framing and headers, operation streams, resume, vector cursors, gaps, tokens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from herald.events import build_event
from tests.herald.http.harness import Herald, LiveHerald, assert_problem
from tests.support.sse import Block, sse_connect

OPERATION_TYPES = ["herald.operation.running", "ChatMessageDelivered", "herald.operation.succeeded"]


async def room_url(herald: Herald, room: str) -> str:
    """The room's SSE subscribe URL, as ``GET /chats/{room}`` hands it out."""
    response = await herald.client.get(f"/chats/{room}")
    assert response.status_code == 200
    url: str = response.json()["subscribe_url"]
    return url


async def publish(herald: Herald, topic: str, n: int, start: int = 0) -> list[str]:
    """Publish ``n`` events straight to the broker; their cursors."""
    return [await herald.broker.publish(topic, build_event("Tick", {"n": start + i}, source="test"))
            for i in range(n)]


def numbers(blocks: list[Block]) -> list[int]:
    """The ``n`` of each ``Tick`` message."""
    return [b.json()["data"]["n"] for b in blocks]


async def test_operation_stream_headers_retry_then_events_in_order_then_the_end(live: LiveHerald) -> None:
    posted = (await live.send(text="streamed")).json()
    async with sse_connect(live.client, posted["subscribe_url"]) as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        first = await stream.next_block()
        assert first.fields == [("retry", "2000")]
        assert stream.raw.startswith(b"retry: 2000\n\n")
        blocks = [b for b in await stream.until_end() if b.is_message]
    assert [b.event for b in blocks] == OPERATION_TYPES
    cursors = [b.id for b in blocks]
    assert all(c is not None for c in cursors)
    assert len(set(cursors)) == 3
    events = [b.json() for b in blocks]
    for block, event in zip(blocks, events, strict=True):
        assert event["type"] == block.event
        assert event["specversion"] == "1.0"
        assert event["correlationid"] == posted["id"]
    # every event of the operation was caused by its request event
    assert len({e["causationid"] for e in events}) == 1
    assert events[1]["data"]["text"] == "streamed"
    assert events[2]["data"]["status"] == "succeeded"
    assert events[2]["data"]["location"] == f"/chats/lobby/messages/{events[1]['data']['id']}"
    assert stream.ended


async def test_a_stream_opened_after_the_end_still_gets_every_event(live: LiveHerald) -> None:
    posted = (await live.send(headers={"Prefer": "wait=5"})).json()
    assert posted["status"] == "succeeded"
    async with sse_connect(live.client, posted["subscribe_url"]) as stream:
        blocks = [b for b in await stream.until_end() if b.is_message]
    assert [b.event for b in blocks] == OPERATION_TYPES


@pytest.mark.parametrize("how", ["header", "query"])
async def test_operation_stream_resumes_right_after_last_event_id(live: LiveHerald, how: str) -> None:
    posted = (await live.send(headers={"Prefer": "wait=5"})).json()
    async with sse_connect(live.client, posted["subscribe_url"]) as stream:
        everything = [b for b in await stream.until_end() if b.is_message]
    cursor = everything[0].id
    assert cursor is not None
    if how == "header":
        opened = sse_connect(live.client, posted["subscribe_url"], headers={"Last-Event-ID": cursor})
    else:
        opened = sse_connect(live.client, posted["subscribe_url"] + f"&last_event_id={cursor}")
    async with opened as stream:
        rest = [b for b in await stream.until_end() if b.is_message]
    assert [(b.id, b.event) for b in rest] == [(b.id, b.event) for b in everything[1:]]


async def test_resuming_after_the_terminal_event_is_204_so_eventsource_stops(live: LiveHerald) -> None:
    posted = (await live.send(headers={"Prefer": "wait=5"})).json()
    async with sse_connect(live.client, posted["subscribe_url"]) as stream:
        everything = [b for b in await stream.until_end() if b.is_message]
    terminal = everything[-1].id
    assert terminal is not None
    response = await live.client.get(posted["subscribe_url"], headers={"Last-Event-ID": terminal})
    assert response.status_code == 204
    assert response.content == b""
    # a cursor before the end still gets the rest, and then the end
    async with sse_connect(live.client, posted["subscribe_url"], headers={"Last-Event-ID": everything[1].id or ""}
                           ) as stream:
        rest = [b for b in await stream.until_end() if b.is_message]
    assert [b.id for b in rest] == [terminal]


async def test_the_same_stream_through_the_topic_endpoint_also_ends_on_the_terminal_event(live: LiveHerald) -> None:
    posted = (await live.send(headers={"Prefer": "wait=5"})).json()
    token = posted["subscribe_url"].split("token=")[1]
    url = f"/topics/operations/{posted['id']}/events?token={token}"
    async with sse_connect(live.client, url) as stream:
        blocks = [b for b in await stream.until_end() if b.is_message]
    assert [b.event for b in blocks] == OPERATION_TYPES


async def test_heartbeat_comments_keep_an_idle_stream_alive(live: LiveHerald) -> None:
    async with sse_connect(live.client, await room_url(live, "quiet")) as stream:
        assert (await stream.next_block()).retry == 2000
        assert (await stream.next_block()).fields == [("id", "0-0")]
        beat = await stream.next_block(timeout=3)
        assert beat.is_heartbeat
        assert beat.comments == [""]
        assert (await stream.next_block(timeout=3)).is_heartbeat
    assert stream.raw == b"retry: 2000\n\nid: 0-0\n\n:\n\n:\n\n"


async def test_a_live_stream_names_its_starting_cursor_so_an_early_reconnect_misses_nothing(live: LiveHerald) -> None:
    url = await room_url(live, "early")
    await publish(live, "chats/early", 1)  # before the stream: not replayed, but it moves the head
    async with sse_connect(live.client, url) as stream:
        assert (await stream.next_block()).retry == 2000
        start = await stream.next_block()
        assert start.fields and start.fields[0][0] == "id" and start.fields[0][1] != "0-0"
    # the client went away before any event; one is published meanwhile
    await publish(live, "chats/early", 1, start=1)
    async with sse_connect(live.client, url, headers={"Last-Event-ID": start.fields[0][1]}) as again:
        missed = await again.messages(1)
    assert numbers(missed) == [1]


async def test_a_domain_topic_starts_live_and_resumes_with_exactly_the_missed_events(live: LiveHerald) -> None:
    url = await room_url(live, "resume")
    await publish(live, "chats/resume", 2)  # before anybody listens: not replayed to a new client
    async with sse_connect(live.client, url) as stream:
        await stream.next_block()  # retry
        await publish(live, "chats/resume", 2, start=2)
        seen = await stream.messages(2)
    assert numbers(seen) == [2, 3]
    await publish(live, "chats/resume", 3, start=4)  # while the client is away
    last = seen[-1].id
    assert last is not None
    async with sse_connect(live.client, url, headers={"Last-Event-ID": last}) as stream:
        missed = await stream.messages(3)
        assert numbers(missed) == [4, 5, 6]
        await publish(live, "chats/resume", 1, start=7)
        (live_one,) = await stream.messages(1)
        assert numbers([live_one]) == [7]  # nothing repeated, nothing skipped


async def test_several_topics_on_one_stream_use_a_vector_cursor(live: LiveHerald) -> None:
    token = live.gateway.signer.issue(["chats/a", "chats/b"])
    url = f"/topics/events?topic=chats/a&topic=chats/b&token={token}"
    async with sse_connect(live.client, url) as stream:
        await stream.next_block()
        (a1,) = await publish(live, "chats/a", 1)
        (b1,) = await publish(live, "chats/b", 1, start=1)
        first, second = await stream.messages(2)
    assert first.id == f"{a1},0-0"  # chats/b had no event yet
    assert second.id == f"{a1},{b1}"
    a2, a3 = await publish(live, "chats/a", 2, start=2)
    (b2,) = await publish(live, "chats/b", 1, start=4)
    assert second.id is not None
    async with sse_connect(live.client, url, headers={"Last-Event-ID": second.id}) as stream:
        missed = await stream.messages(3)
    # each topic's missed events in order, topic by topic; every id carries both topics' positions
    assert [(b.json()["data"]["n"], b.id) for b in missed] == [(2, f"{a2},{b1}"), (3, f"{a3},{b1}"), (4, f"{a3},{b2}")]


async def test_a_topic_that_was_empty_is_replayed_from_its_start_on_resume(live: LiveHerald) -> None:
    token = live.gateway.signer.issue(["chats/c", "chats/d"])
    url = f"/topics/events?topic=chats/c&topic=chats/d&token={token}"
    async with sse_connect(live.client, url) as stream:
        await stream.next_block()
        (c1,) = await publish(live, "chats/c", 1)
        (seen,) = await stream.messages(1)
    assert seen.id == f"{c1},0-0"  # chats/d had no event yet: its slot says "before the first"
    await publish(live, "chats/d", 2, start=1)  # while the client is away
    async with sse_connect(live.client, url, headers={"Last-Event-ID": seen.id}) as stream:
        missed = await stream.messages(2)
    assert numbers(missed) == [1, 2]


async def test_a_cursor_older_than_the_history_gets_a_gap_event_first(
    make_live: Callable[..., Awaitable[LiveHerald]],
) -> None:
    live = await make_live(history_size=2)
    cursors = await publish(live, "chats/gap", 5)
    async with sse_connect(live.client, await room_url(live, "gap"), headers={"Last-Event-ID": cursors[0]}) as stream:
        assert (await stream.next_block()).retry is not None
        gap = await stream.next_message()
        kept = await stream.messages(2)
    assert gap.event == "herald.gap"
    assert gap.id is None  # a notice, not a position to resume from
    assert gap.json()["topic"] == "chats/gap"
    assert gap.json()["cursor"] == cursors[0]
    assert gap.json()["oldest"] == cursors[3]
    assert numbers(kept) == [3, 4]
    assert [b.id for b in kept] == cursors[3:]


async def test_a_cursor_of_a_lost_history_gets_a_gap_whose_id_starts_that_topic_over(live: LiveHerald) -> None:
    token = live.gateway.signer.issue(["chats/v1", "chats/v2"])
    url = f"/topics/events?topic=chats/v1&topic=chats/v2&token={token}"
    a = await publish(live, "chats/v1", 2)
    (b1,) = await publish(live, "chats/v2", 1, start=2)
    lost = "99999999999999-0.zzzzzzzz"  # of a history chats/v1 no longer has (a memory epoch is <= 6 characters)
    async with sse_connect(live.client, url, headers={"Last-Event-ID": f"{lost},{b1}"}) as stream:
        gap, *replayed = await stream.messages(3)
    assert (gap.event, gap.id) == ("herald.gap", f"0-0,{b1}")  # a resume from here does not report it again
    assert gap.json() == {"topic": "chats/v1", "cursor": lost, "oldest": a[0],
                          "detail": "events after your cursor are no longer kept; some were missed"}
    # the whole new history, though its positions are older than the lost cursor's
    assert [(b.json()["data"]["n"], b.id) for b in replayed] == [(0, f"{a[0]},{b1}"), (1, f"{a[1]},{b1}")]


async def test_a_cursor_within_the_history_gets_no_gap(make_live: Callable[..., Awaitable[LiveHerald]]) -> None:
    live = await make_live(history_size=2)
    cursors = await publish(live, "chats/nogap", 5)
    async with sse_connect(live.client, await room_url(live, "nogap"), headers={"Last-Event-ID": cursors[3]}) as s:
        (only,) = await s.messages(1)
    assert numbers([only]) == [4]
    assert b"herald.gap" not in s.raw


# Refusals (no stream opens, so the ASGI client is enough) ----------------------------------------


async def test_no_token_is_401(idle_herald: Herald) -> None:
    response = await idle_herald.client.get("/topics/chats/lobby/events")
    assert_problem(response, 401, "invalid-token")
    assert response.headers["www-authenticate"] == 'Bearer realm="herald"'


async def test_a_forged_token_is_401(idle_herald: Herald) -> None:
    from herald.auth import TokenSigner

    forged = TokenSigner("another-secret-0123456789abcdefghijklmnop").issue(["chats/lobby"])
    assert_problem(await idle_herald.client.get(f"/topics/chats/lobby/events?token={forged}"), 401, "invalid-token")
    assert_problem(await idle_herald.client.get("/topics/chats/lobby/events?token=garbage"), 401, "invalid-token")


async def test_an_expired_token_is_401(idle_herald: Herald) -> None:
    expired = idle_herald.gateway.signer.issue(["chats/lobby"], ttl=-60)
    doc = assert_problem(await idle_herald.client.get(f"/topics/chats/lobby/events?token={expired}"), 401)
    assert "expired" in doc["detail"]


async def test_a_token_for_another_topic_is_403(idle_herald: Herald) -> None:
    other = idle_herald.gateway.signer.issue(["chats/other"])
    doc = assert_problem(await idle_herald.client.get(f"/topics/chats/lobby/events?token={other}"), 403,
                         "forbidden-topic")
    assert "chats/lobby" in doc["detail"]


async def test_an_operation_token_does_not_open_another_operation(idle_herald: Herald) -> None:
    first, second = (await idle_herald.send()).json(), (await idle_herald.send()).json()
    token = first["subscribe_url"].split("token=")[1]
    assert_problem(await idle_herald.client.get(f"/operations/{second['id']}/events?token={token}"), 403)


async def test_a_multi_topic_stream_needs_every_topic_in_the_token(idle_herald: Herald) -> None:
    token = idle_herald.gateway.signer.issue(["chats/a"])
    response = await idle_herald.client.get(f"/topics/events?topic=chats/a&topic=chats/b&token={token}")
    assert_problem(response, 403, "forbidden-topic")


@pytest.mark.parametrize("cursor", ["garbage", "1-2-3", "1-0,2-0", "12", "-1-0"])
async def test_a_garbage_last_event_id_is_400(idle_herald: Herald, cursor: str) -> None:
    token = idle_herald.gateway.signer.issue(["chats/lobby"])
    response = await idle_herald.client.get(f"/topics/chats/lobby/events?token={token}",
                                            headers={"Last-Event-ID": cursor})
    assert_problem(response, 400, "bad-cursor")


async def test_a_garbage_last_event_id_query_is_400(idle_herald: Herald) -> None:
    posted = (await idle_herald.send()).json()
    response = await idle_herald.client.get(posted["subscribe_url"] + "&last_event_id=nope")
    assert_problem(response, 400, "bad-cursor")


async def test_a_vector_cursor_with_the_wrong_number_of_slots_is_400(idle_herald: Herald) -> None:
    token = idle_herald.gateway.signer.issue(["chats/a", "chats/b"])
    response = await idle_herald.client.get(f"/topics/events?topic=chats/a&topic=chats/b&token={token}",
                                            headers={"Last-Event-ID": "1-0"})
    doc = assert_problem(response, 400, "bad-cursor")
    assert "2 topics" in doc["detail"]


@pytest.mark.parametrize(
    "query",
    ["", "topic=", "topic=chats/a&topic=chats/a", "topic=bad%20topic", "topic=chats/..%2Fx"],
)
async def test_bad_topic_lists_are_400(idle_herald: Herald, query: str) -> None:
    token = idle_herald.gateway.signer.issue(["chats/a"])
    response = await idle_herald.client.get(f"/topics/events?{query}&token={token}")
    assert_problem(response, 400)


async def test_too_many_topics_is_400(make_herald: Callable[..., Awaitable[Herald]]) -> None:
    herald = await make_herald(embedded_worker=False, max_topics_per_connection=2)
    topics = ["chats/a", "chats/b", "chats/c"]
    token = herald.gateway.signer.issue(topics)
    response = await herald.client.get("/topics/events?" + "&".join(f"topic={t}" for t in topics) + f"&token={token}")
    assert_problem(response, 400, "too-many-topics")


async def test_an_unknown_operation_stream_is_404(idle_herald: Herald) -> None:
    token = idle_herald.gateway.signer.issue(["operations/op_missing000000000000000"])
    response = await idle_herald.client.get(f"/operations/op_missing000000000000000/events?token={token}")
    assert_problem(response, 404, "operation-not-found")

