"""The auto-pipeline: one write per loop turn, replies matched in order, and failures that fail fast."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import hiredis
import pytest
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.broker.pipeline import AutoPipeline, pack


def connection_to(url: str) -> Callable[[], Connection]:
    """Unconnected redis-py connections to ``url``, without a socket timeout (the pipeline keeps its own)."""
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    return lambda: Connection(host=host, port=int(port), socket_timeout=None)


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[AutoPipeline]:
    pipeline = AutoPipeline(connection_to(redis_url), timeout=2.0)
    yield pipeline
    await pipeline.close()


def test_commands_are_packed_as_resp_arrays_of_bulk_strings() -> None:
    assert pack(["SET", b"k\r\n", 12, 1.5]) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n"
    with pytest.raises(TypeError):
        pack(["SET", "k", True])


@pytest.mark.redis
async def test_the_commands_of_one_loop_turn_go_out_in_one_write_and_get_their_own_replies(
    pipe: AutoPipeline,
) -> None:
    await pipe.execute("SET", "n", 0)
    writes = pipe.writes
    replies = await asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(100)))
    assert replies == list(range(1, 101))
    assert pipe.writes == writes + 1


@pytest.mark.redis
async def test_an_error_reply_fails_only_its_own_command(pipe: AutoPipeline) -> None:
    await pipe.execute("SET", "text", "not a number")
    results = await asyncio.gather(pipe.execute("GET", "text"), pipe.execute("INCR", "text"),
                                   pipe.execute("GET", "text"), return_exceptions=True)
    assert results[0] == results[2] == b"not a number"
    assert isinstance(results[1], ResponseError)
    replies = await pipe.execute_many([["INCR", "text"], ["SET", "other", 1], ["GET", "other"]])
    assert isinstance(replies[0], ResponseError) and replies[1:] == [b"OK", b"1"]


@pytest.mark.redis
async def test_a_cancelled_caller_leaves_the_replies_of_the_others_in_order(pipe: AutoPipeline) -> None:
    await pipe.execute("SET", "a", "A")
    await pipe.execute("SET", "b", "B")
    slow = asyncio.ensure_future(pipe.execute("GET", "a"))
    other = asyncio.ensure_future(pipe.execute("GET", "b"))
    await asyncio.sleep(0)  # both are in the outbox
    slow.cancel()
    assert await other == b"B"
    assert await pipe.execute("GET", "a") == b"A"


@pytest.mark.redis
async def test_a_script_redis_lost_is_loaded_and_run_once(pipe: AutoPipeline) -> None:
    script = AsyncScript(None, b"return redis.call('INCR', KEYS[1])")  # type: ignore[arg-type]  # no client: bytes
    assert await pipe.script(script, ["runs"], []) == 1
    await pipe.execute("SCRIPT", "FLUSH")  # as after a restart without persistence
    assert await pipe.script(script, ["runs"], []) == 2


class FakeRedis:
    """A server that answers every command ``+OK`` until told to go silent or to hang up on the next command."""

    def __init__(self) -> None:
        self.silent = False
        self.hang_up = False
        self.commands: list[list[bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                self.commands.append(command)
                if self.hang_up:
                    writer.close()
                    return
                if not self.silent:
                    writer.write(b"+OK\r\n")

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeRedis, AutoPipeline]]:
    server = FakeRedis()
    port = await server.start()
    pipeline = AutoPipeline(lambda: Connection(host="127.0.0.1", port=port, socket_timeout=None), timeout=0.3)
    yield server, pipeline
    await pipeline.close()
    await server.close()


async def test_calls_waiting_on_a_redis_that_stopped_answering_fail_after_the_timeout_then_it_reconnects(
    fake: tuple[FakeRedis, AutoPipeline],
) -> None:
    server, pipe = fake
    assert await pipe.execute("PING") == b"OK"
    server.silent = True
    results = await asyncio.gather(*(pipe.execute("GET", "x") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    server.silent = False
    assert await pipe.execute("PING") == b"OK"  # on a new connection


async def test_calls_waiting_on_a_connection_that_closed_fail_at_once_then_it_reconnects(
    fake: tuple[FakeRedis, AutoPipeline],
) -> None:
    server, pipe = fake
    assert await pipe.execute("PING") == b"OK"
    server.hang_up = True
    async with asyncio.timeout(0.25):  # well before the timeout: the broken connection is noticed, not waited out
        results = await asyncio.gather(*(pipe.execute("GET", "x") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    server.hang_up = False
    assert await pipe.execute("PING") == b"OK"
    assert [c[0] for c in server.commands].count(b"GET") == 1  # nothing sent twice: the server hung up on the first
