"""SIGTERM with push clients attached: they are told to reconnect elsewhere, and the process exits."""

from __future__ import annotations

import asyncio
import signal

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e


async def test_sigterm_tells_sse_and_websocket_clients_to_reconnect_and_exits_cleanly() -> None:
    with HeraldServer() as server:
        assert server.process is not None
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            room = (await client.get("/chats/stopping")).json()
            async with sse_connect(client, room["subscribe_url"]) as stream, connect(
                room["websocket_url"], open_timeout=5, proxy=None
            ) as ws:
                await stream.next_block()
                assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
                await client.post("/chats/stopping/messages", json={"author": "ann", "text": "last"},
                                  headers={"Prefer": "wait=5"})
                delivered = await stream.next_message()
                assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "event"

                server.process.send_signal(signal.SIGTERM)
                notice = await stream.next_message()
                assert await stream.until_end() == []
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
        code = await asyncio.to_thread(server.process.wait, 10)
    assert notice.event == "herald.disconnect"
    assert notice.json()["reason"] == "shutdown"
    assert notice.json()["reconnect"] is True
    assert notice.json()["cursor"] == delivered.id  # where to resume on another gateway
    assert ws.close_code == 4001
    # uvicorn shuts down gracefully, then re-raises the signal it caught (its usual exit status)
    assert code == -signal.SIGTERM
    assert "Application shutdown complete." in server.log()
    assert "Traceback" not in server.log()
