"""The chat domain: send, deliver, read receipts, the room's URLs and its recent messages."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.chat import chat, message_id_for, message_path
from herald.operations import operation_topic
from herald.worker import Worker
from tests.herald.http.harness import Herald, LiveHerald, assert_problem
from tests.support.sse import sse_connect


async def send_and_wait(herald: Herald, room: str = "lobby", text: str = "hello") -> dict[str, Any]:
    """Send a message and wait for its operation to end; the finished operation."""
    response = await herald.send(room=room, text=text, headers={"Prefer": "wait=5"})
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def test_send_delivers_on_the_operation_and_the_room(herald: Herald) -> None:
    op = await send_and_wait(herald, room="deliver", text="hi all")
    message = op["result"]
    assert message["id"] == message_id_for(op["id"])
    assert (message["room"], message["author"], message["text"], message["read_by"]) == ("deliver", "ann", "hi all", [])
    assert message["operation_id"] == op["id"]
    on_op = [s.event for s in (await herald.broker.read(operation_topic(op["id"]), None)).events]
    on_room = [s.event for s in (await herald.broker.read("chats/deliver", None)).events]
    delivered = [e for e in on_op if e.type == "ChatMessageDelivered"]
    assert len(delivered) == 1
    assert on_room == delivered  # the same event on both topics
    event = delivered[0]
    assert event.correlationid == op["id"]
    assert event.subject == f"/chats/deliver/messages/{message['id']}"
    assert event.data == message


async def test_a_redelivered_send_keeps_the_message_its_first_run_stored(idle_herald: Herald) -> None:
    response = await idle_herald.send(room="again", text="hi")
    assert response.status_code == 202
    op_id = response.json()["id"]
    path = message_path("again", message_id_for(op_id))
    # what a first run stored before its worker died, unacknowledged
    first = {"id": message_id_for(op_id), "room": "again", "author": "ann", "text": "hi",
             "sent_at": "2020-01-01T00:00:00Z", "delivered_at": "2020-01-01T00:00:01Z", "read_by": [],
             "operation_id": op_id}
    await idle_herald.broker.put_resource(path, first, ttl=60)
    worker = Worker(idle_herald.broker, chat.handlers, poll=0.05)
    await asyncio.wait_for(worker.run(burst=True), 10)
    doc = await idle_herald.wait_status(op_id, "succeeded")
    assert (await idle_herald.client.get(f"/operations/{op_id}", follow_redirects=True)).json() == first
    assert await idle_herald.broker.get_resource(path) == first
    delivered = [s.event for s in (await idle_herald.broker.read("chats/again", None)).events]
    assert [e.data for e in delivered] == [first]
    assert doc["status"] == "succeeded"


async def test_the_send_operation_redirects_to_the_message(herald: Herald) -> None:
    op = await send_and_wait(herald, text="find me")
    redirect = await herald.client.get(op["operation_url"])
    assert redirect.status_code == 303
    message = await herald.client.get(redirect.headers["location"])
    assert message.status_code == 200
    assert message.json() == op["result"]


async def test_a_read_receipt_goes_to_the_room_and_updates_read_by(herald: Herald) -> None:
    mid = (await send_and_wait(herald, room="reads"))["result"]["id"]
    response = await herald.client.post(f"/chats/reads/messages/{mid}/read", json={"reader": "bob"},
                                        headers={"Prefer": "wait=5"})
    assert response.status_code == 200
    receipt_op = response.json()
    assert receipt_op["type"] == "ChatMessageRead"
    assert receipt_op["status"] == "succeeded"
    assert receipt_op["result"]["reader"] == "bob"
    room_events = [s.event for s in (await herald.broker.read("chats/reads", None)).events]
    assert [e.type for e in room_events] == ["ChatMessageDelivered", "ChatMessageRead"]
    read = room_events[1]
    assert read.correlationid == receipt_op["id"]
    assert (read.data["message_id"], read.data["reader"], read.data["room"]) == (mid, "bob", "reads")
    assert (await herald.client.get(f"/chats/reads/messages/{mid}")).json()["read_by"] == ["bob"]
    listed = (await herald.client.get("/chats/reads/messages")).json()["messages"]
    assert listed[0]["read_by"] == ["bob"]


async def test_reading_twice_records_the_reader_once(herald: Herald) -> None:
    mid = (await send_and_wait(herald, room="twice"))["result"]["id"]
    for _ in range(2):
        response = await herald.client.post(f"/chats/twice/messages/{mid}/read", json={"reader": "bob"},
                                            headers={"Prefer": "wait=5"})
        assert response.json()["status"] == "succeeded"
    assert (await herald.client.get(f"/chats/twice/messages/{mid}")).json()["read_by"] == ["bob"]
    types = [s.event.type for s in (await herald.broker.read("chats/twice", None)).events]
    assert types.count("ChatMessageRead") == 1


async def test_a_receipt_for_a_message_that_does_not_exist_fails_with_404_problem(herald: Herald) -> None:
    response = await herald.client.post("/chats/lobby/messages/m_doesnotexist/read", json={"reader": "bob"},
                                        headers={"Prefer": "wait=5"})
    assert response.status_code == 200
    op = response.json()
    assert op["status"] == "failed"
    assert (op["error"]["status"], op["error"]["title"]) == (404, "No such message")


@pytest.mark.parametrize(("mid", "body", "status", "kind"), [
    ("not-a-message-id", {"reader": "bob"}, 404, "no-such-message"),
    ("m_abcdef", {}, 422, "invalid-command"),
    ("m_abcdef", {"reader": "bob", "extra": 1}, 422, "invalid-command"),
])
async def test_bad_read_receipts(idle_herald: Herald, mid: str, body: dict[str, Any], status: int, kind: str) -> None:
    response = await idle_herald.client.post(f"/chats/lobby/messages/{mid}/read", json=body)
    assert_problem(response, status, kind)


async def test_the_room_hands_out_urls_whose_token_opens_only_that_room(herald: Herald) -> None:
    response = await herald.client.get("/chats/urls")
    assert response.status_code == 200
    room = response.json()
    assert room["room"] == "urls"
    assert room["messages_url"] == "/chats/urls/messages"
    assert room["subscribe_url"].startswith("/topics/chats/urls/events?token=")
    assert room["websocket_url"].startswith("/ws?topic=chats/urls&token=")  # Host herald.test is not trusted
    token = room["subscribe_url"].split("token=")[1]
    assert herald.gateway.signer.verify(token).topics == {"chats/urls"}
    assert_problem(await herald.client.get(f"/topics/chats/other/events?token={token}"), 403)
    assert (await herald.client.get(room["messages_url"])).status_code == 200


async def test_the_room_subscribe_url_streams_the_room(live: LiveHerald) -> None:
    room = (await live.client.get("/chats/streamed")).json()
    async with sse_connect(live.client, room["subscribe_url"]) as stream:
        await stream.next_block()
        op = (await live.send(room="streamed", text="live!")).json()
        block = await stream.next_message()
    assert block.event == "ChatMessageDelivered"
    assert block.json()["correlationid"] == op["id"]
    assert block.json()["data"]["text"] == "live!"


async def test_recent_messages_oldest_first_with_a_limit_and_the_cursor(herald: Herald) -> None:
    sent = [(await send_and_wait(herald, room="recent", text=f"n{i}"))["result"]["id"] for i in range(4)]
    listing = (await herald.client.get("/chats/recent/messages")).json()
    assert listing["room"] == "recent"
    assert [m["id"] for m in listing["messages"]] == sent
    assert [m["text"] for m in listing["messages"]] == ["n0", "n1", "n2", "n3"]
    head = (await herald.broker.read("chats/recent", None)).events[-1].cursor
    assert listing["cursor"] == head  # subscribe from here and nothing is missed or repeated
    limited = (await herald.client.get("/chats/recent/messages", params={"limit": 2})).json()
    assert [m["id"] for m in limited["messages"]] == sent[2:]


async def test_an_empty_room_lists_nothing(herald: Herald) -> None:
    assert (await herald.client.get("/chats/empty/messages")).json() == {"room": "empty", "messages": [],
                                                                         "cursor": None}


@pytest.mark.parametrize("limit", ["0", "501", "many"])
async def test_a_bad_limit_is_400(herald: Herald, limit: str) -> None:
    assert_problem(await herald.client.get("/chats/lobby/messages", params={"limit": limit}), 400, "bad-limit")


async def test_an_unknown_message_is_404(herald: Herald) -> None:
    assert_problem(await herald.client.get("/chats/lobby/messages/m_unknown00"), 404, "no-such-message")


@pytest.mark.parametrize("path", ["/chats/-bad", "/chats/-bad/messages", "/chats/-bad/messages/m_abcd"])
async def test_an_impossible_room_is_404_on_reads(herald: Herald, path: str) -> None:
    assert_problem(await herald.client.get(path), 404, "no-such-room")
