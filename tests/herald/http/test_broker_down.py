"""When the broker cannot be reached: 503 problems with Retry-After, never a 202 for lost work.

The memory broker cannot fail by itself, so these tests make one of its methods raise
:class:`BrokerUnavailable`, exactly as the Redis broker does when its server is gone.
"""

from __future__ import annotations

from typing import Any

import pytest

from herald.broker.base import BrokerUnavailable
from tests.herald.http.harness import Herald, assert_problem


def break_broker(monkeypatch: pytest.MonkeyPatch, herald: Herald, *methods: str) -> None:
    """Make ``methods`` of the app's broker raise BrokerUnavailable."""

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise BrokerUnavailable("connection refused")

    for name in methods:
        monkeypatch.setattr(herald.broker, name, unavailable)


async def test_a_command_is_refused_with_503_not_accepted(idle_herald: Herald, monkeypatch: pytest.MonkeyPatch) -> None:
    break_broker(monkeypatch, idle_herald, "accept")
    response = await idle_herald.send()
    assert_problem(response, 503, "broker-unavailable")
    assert response.headers["retry-after"] == "2"
    assert "location" not in response.headers


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_operation_reads_and_cancels_are_503(
    idle_herald: Herald, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    op_id = (await idle_herald.send()).json()["id"]
    break_broker(monkeypatch, idle_herald, "get_operation")
    response = await idle_herald.client.request(method, f"/operations/{op_id}")
    assert_problem(response, 503, "broker-unavailable")
    assert response.headers["retry-after"] == "2"


async def test_streams_are_refused_with_503(idle_herald: Herald, monkeypatch: pytest.MonkeyPatch) -> None:
    posted = (await idle_herald.send()).json()
    room_url = (await idle_herald.client.get("/chats/lobby")).json()["subscribe_url"]
    break_broker(monkeypatch, idle_herald, "get_operation", "read", "head")
    assert_problem(await idle_herald.client.get(posted["subscribe_url"]), 503, "broker-unavailable")
    assert_problem(await idle_herald.client.get(room_url), 503, "broker-unavailable")
    assert idle_herald.gateway.hub.connections == 0  # the failed stream left nothing behind


async def test_chat_reads_are_503(idle_herald: Herald, monkeypatch: pytest.MonkeyPatch) -> None:
    break_broker(monkeypatch, idle_herald, "tail", "get_resource")
    assert_problem(await idle_herald.client.get("/chats/lobby/messages"), 503, "broker-unavailable")
    assert_problem(await idle_herald.client.get("/chats/lobby/messages/m_abcdef"), 503, "broker-unavailable")


async def test_readyz_is_503_while_the_broker_does_not_answer(idle_herald: Herald,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def no(*args: Any) -> bool:
        return False

    monkeypatch.setattr(idle_herald.broker, "ping", no)
    response = await idle_herald.client.get("/readyz")
    assert_problem(response, 503, "broker-unavailable")
    assert (await idle_herald.client.get("/healthz")).status_code == 200  # alive, just not ready
