"""The event publisher of scenarios B and C, run as its own process so it does not share a core's time
with the subscribers' receive loop.

``python -m bench.publisher SPEC_JSON`` connects, prints ``ready``, waits for ``go`` on stdin,
publishes, and prints one JSON line of statistics. Every event is the same CloudEvents envelope
for every target, its ``data`` being ``{"seq": n, "t": publish_time_ns}`` stamped right before the
publish call:

* ``herald``: through the RedisBroker's own publish path (topic stream + pub/sub), so the format
  is exactly what Herald's workers write;
* ``naive``: ``PUBLISH`` of the envelope on the topic's channel;
* ``nchan``: ``POST /pub/{channel}`` with the envelope as the body (nchan stores it in Redis).

Spec keys: ``kind``, ``redis_url``, ``http_port``, ``mode`` (``rate``: ``count`` events on
``topics[0]`` at ``rate``/s; ``each``: one event on every topic, ``concurrency`` at a time).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from app.events import build_event

Publish = Callable[[str, int], Awaitable[None]]


def tick(seq: int) -> Any:
    """A bench event stamped with the time it is published."""
    return build_event("bench.tick", {"seq": seq, "t": time.time_ns()}, source="herald-bench")


async def _publisher(spec: dict[str, Any]) -> tuple[Publish, Callable[[], Awaitable[None]]]:
    kind = spec["kind"]
    if kind == "herald":
        from app.broker import create_broker

        broker = create_broker(spec["redis_url"])
        await broker.start()

        async def publish_herald(topic: str, seq: int) -> None:
            await broker.publish(topic, tick(seq))

        return publish_herald, broker.close
    if kind == "naive":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(spec["redis_url"])
        await client.ping()

        async def publish_naive(topic: str, seq: int) -> None:
            await client.publish(topic, tick(seq).encoded)

        return publish_naive, client.aclose
    if kind == "nchan":
        from bench.loadgen import HTTPPool

        pool = await HTTPPool("127.0.0.1", spec["http_port"], size=spec.get("concurrency", 1)).start()

        async def publish_nchan(topic: str, seq: int) -> None:
            status, body = await pool.post(f"/pub/{topic}", tick(seq).encoded)
            if status not in (200, 201, 202):
                raise RuntimeError(f"nchan publish answered {status}: {body[:200]!r}")

        async def close_pool() -> None:
            pool.close()

        return publish_nchan, close_pool
    raise ValueError(f"unknown publisher kind {kind!r}")


async def run(spec: dict[str, Any], start: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """Publish as ``spec`` says once ``start`` returns; the statistics of the run."""
    publish, close = await _publisher(spec)
    errors = 0
    published = 0
    await start()
    first = time.time_ns()
    deadline = time.monotonic() + spec.get("max_seconds", 60)
    try:
        if spec["mode"] == "rate":
            topic = spec["topics"][0]
            rate = float(spec["rate"])
            t0 = time.monotonic()
            for seq in range(int(spec["count"])):
                delay = t0 + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() > deadline:
                    break
                try:
                    await publish(topic, seq)
                    published += 1
                except Exception:
                    errors += 1
        else:
            queue = list(enumerate(spec["topics"]))
            queue.reverse()

            async def worker() -> None:
                nonlocal errors, published
                while queue and time.monotonic() < deadline:
                    seq, topic = queue.pop()
                    try:
                        await publish(topic, seq)
                        published += 1
                    except Exception:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(int(spec.get("concurrency", 16)))))
    finally:
        last = time.time_ns()
        await close()
    seconds = (last - first) / 1e9
    return {"published": published, "errors": errors, "first_ns": first, "last_ns": last, "seconds": seconds,
            "rate": (published - 1) / seconds if published > 1 and seconds > 0 else None}


async def main(argv: list[str]) -> None:
    """Run one spec, synchronised with the bench through stdin and stdout."""
    spec = orjson.loads(argv[0])
    loop = asyncio.get_running_loop()

    async def start() -> None:
        print("ready", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit("publisher: expected 'go'")

    stats = await run(spec, start)
    print(orjson.dumps(stats).decode(), flush=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1:]))
