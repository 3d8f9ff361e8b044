"""The event publisher of scenarios B and C, run as its own process so it does not share a core's time
with the subscribers' receive loop.

``python -m bench.publisher`` reads its spec (one JSON line) on stdin, connects, prints ``ready``,
waits for ``go`` on stdin,
publishes, and prints one JSON line of statistics. Every event is the same CloudEvents envelope
for every target, its ``data`` being ``{"seq": n, "t": publish_time_ns}``, stamped once per batch
right before the batch is written. Events due together go out together, as each target best takes
a batch:

* ``herald``: the RedisBroker's own publish command (``RedisBroker.publish_command``: EVALSHA of
  the append-and-PUBLISH script), one per event, pipelined, so the format is exactly what
  Herald's workers write;
* ``naive``: ``PUBLISH`` of the envelope on the topic's channel, pipelined;
* ``nchan``: ``POST /pub/{channel}`` per event with the envelope as the body, ``concurrency``
  requests at a time (nchan has no batch publish; it stores the message in Redis).

With ``"via": "http"``, Herald is published to as any backend would: ``POST /topics/{topic}/events``
with a publisher token (signed with ``publish_key``), a batch as one JSON array (one event alone is
sent as a single object).

For Redis, the commands are packed by hand and written to one raw connection, and the replies
parsed with hiredis: through redis-py's pipeline the publisher spent about 50 µs of CPU per event,
more than the gateway it was loading (the issue asks for a load generator that is not the
bottleneck; on two shared cores every µs it spends is taken from the server).

Spec keys: ``kind``, ``redis_url``, ``http_port``, ``topics``, ``mode`` and ``max_seconds``.
``rate``: ``count`` events, event ``n`` on ``topics[n % len(topics)]`` at ``t0 + n / rate``.
``burst``: one event on every topic as fast as it goes, in batches of ``batch``, ``concurrency``
batches at a time; ``rounds`` times (default 1), event ``r * len(topics) + i`` on ``topics[i]``
in round ``r``. After each round but the last it prints ``round {json}`` (that round's
``first_ns``, ``last_ns``, ``published``) and waits for ``go`` again, so the bench can let the
subscribers drain before the next burst: one 2,000-event burst lasts about 0.1 s, too short
for one sample to stand for the rate.
``stream``: ``count`` events as fast as they go, in batches of ``batch`` events to one topic, by
``concurrency`` workers that each own the topics ``topics[w::concurrency]`` (so each topic's
events are published, and stored, in order).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis
import jwt
import orjson

from herald.events import Event, build_event

Publish = Callable[[Sequence[tuple[str, int]]], Awaitable[None]]


def tick(seq: int) -> Event:
    """A bench event stamped with the time it is published."""
    return build_event("bench.tick", {"seq": seq, "t": time.time_ns()}, source="herald-bench")


class Ticks:
    """Bench events made from one template: only ``id`` and ``data`` change (about 2 µs an event)."""

    def __init__(self) -> None:
        template = orjson.loads(tick(0).encoded)
        self._before = {k: v for k, v in template.items() if k not in ("id", "data")}
        self._prefix = "bench-" + template["id"][:8] + "-"

    def encoded(self, seq: int, stamp: int) -> bytes:
        """The JSON of event ``seq`` stamped ``stamp`` (ns)."""
        return orjson.dumps({**self._before, "id": f"{self._prefix}{seq}", "data": {"seq": seq, "t": stamp}})


def _pack(*args: str | bytes | int) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RawRedis:
    """One connection that writes pipelined commands and reads their replies with hiredis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader()
        self.lock = asyncio.Lock()  # one batch in flight per connection: replies come back in order

    @classmethod
    async def connect(cls, url: str) -> RawRedis:
        """Connect to ``redis://host:port`` (the bench's own server: no password, no TLS)."""
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
        return cls(reader, writer)

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Write the packed commands at once; their replies (errors as ``hiredis.ReplyError``)."""
        async with self.lock:
            self.writer.write(b"".join(commands))
            replies: list[Any] = []
            while len(replies) < len(commands):
                reply = self.parser.gets()
                if reply is False:
                    data = await self.reader.read(65536)
                    if not data:
                        raise ConnectionError("Redis closed the connection")
                    self.parser.feed(data)
                    continue
                replies.append(reply)
            return replies

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        await self.writer.wait_closed()


async def _publisher(spec: dict[str, Any]) -> tuple[Publish, Callable[[], Awaitable[None]]]:
    kind = spec["kind"]
    ticks = Ticks()
    if kind == "herald" and spec.get("via") == "http":
        return await _herald_http(spec, ticks)
    if kind == "herald" and spec.get("via") == "mercure":
        from bench.mercure import mercure_publisher

        return await mercure_publisher(spec, ticks.encoded)
    if kind == "herald" and str(spec.get("redis_url", "")).startswith("redis+cluster://"):
        from bench.cluster import cluster_publisher

        return await cluster_publisher(spec, ticks.encoded)
    if kind in ("herald", "naive"):
        pool = [await RawRedis.connect(spec["redis_url"]) for _ in range(int(spec.get("concurrency", 4)))]
        turn = itertools.cycle(pool)
        if kind == "herald":
            from herald.broker.redis import RedisBroker

            broker = RedisBroker(spec["redis_url"])
            await broker.publish_many([("bench-warm-up", tick(-1))])  # loads the publish script into Redis
            await broker.close()

            def command(topic: str, seq: int, stamp: int) -> bytes:
                return _pack(*broker.publish_command(topic, "bench.tick", ticks.encoded(seq, stamp)))
        else:
            def command(topic: str, seq: int, stamp: int) -> bytes:
                return _pack("PUBLISH", topic, ticks.encoded(seq, stamp))

        async def publish_redis(batch: Sequence[tuple[str, int]]) -> None:
            stamp = time.time_ns()
            replies = await next(turn).execute([command(topic, seq, stamp) for topic, seq in batch])
            failed = [r for r in replies if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(replies)} publishes failed: {failed[0]}")

        async def close_all() -> None:
            for conn in pool:
                await conn.close()

        return publish_redis, close_all
    if kind == "nchan":
        from bench.loadgen import HTTPPool

        pool_http = await HTTPPool("127.0.0.1", spec["http_port"], size=int(spec.get("concurrency", 8))).start()

        async def post(topic: str, seq: int, stamp: int) -> None:
            status, body = await pool_http.post(f"/pub/{topic}", ticks.encoded(seq, stamp))
            if status not in (200, 201, 202):
                raise RuntimeError(f"nchan publish answered {status}: {body[:200]!r}")

        async def publish_nchan(batch: Sequence[tuple[str, int]]) -> None:
            stamp = time.time_ns()
            if spec["mode"] == "stream":  # one topic: one request after the other, so they are stored in order
                for topic, seq in batch:
                    await post(topic, seq, stamp)
                return
            await asyncio.gather(*(post(topic, seq, stamp) for topic, seq in batch))

        async def close_pool() -> None:
            pool_http.close()

        return publish_nchan, close_pool
    raise ValueError(f"unknown publisher kind {kind!r}")


async def _herald_http(spec: dict[str, Any], ticks: Ticks) -> tuple[Publish, Callable[[], Awaitable[None]]]:
    """Herald's publish API: one ``POST /topics/{topic}/events`` per batch, as any backend would publish."""
    from bench.loadgen import HTTPPool

    pool = await HTTPPool("127.0.0.1", spec["http_port"], size=int(spec.get("concurrency", 4))).start()
    token = jwt.encode({"sub": "bench-publisher", "exp": int(time.time()) + 3600,
                        "herald": {"publish": ["**"]}}, spec["publish_key"], "HS256")
    headers = {"Authorization": f"Bearer {token}"}

    async def publish_http(batch: Sequence[tuple[str, int]]) -> None:
        stamp = time.time_ns()
        topic = batch[0][0]
        events = [ticks.encoded(seq, stamp) for _, seq in batch]
        body = events[0] if len(events) == 1 else b"[" + b",".join(events) + b"]"
        status, answer = await pool.post(f"/topics/{topic}/events", body, headers=headers)
        if status != 200:
            raise RuntimeError(f"publish answered {status}: {answer[:200]!r}")

    async def close_pool() -> None:
        pool.close()

    return publish_http, close_pool


async def run(spec: dict[str, Any], start: Callable[[], Awaitable[None]],
              between: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Publish as ``spec`` says once ``start`` returns; the statistics of the run.

    In burst mode with ``rounds`` > 1, ``between`` gets each round's statistics but the last
    one's and returns when the next round may start.
    """
    publish, close = await _publisher(spec)
    errors = 0
    published = 0
    topics: list[str] = spec["topics"]
    deadline = time.monotonic() + spec.get("max_seconds", 60)
    rounds: list[dict[str, Any]] = []

    async def send(batch: Sequence[tuple[str, int]]) -> None:
        nonlocal errors, published
        try:
            await publish(batch)
            published += len(batch)
        except Exception:
            errors += len(batch)

    async def burst(offset: int) -> None:
        size = int(spec.get("batch", 50))
        batches = [[(topics[n], offset + n) for n in range(i, min(i + size, len(topics)))]
                   for i in range(0, len(topics), size)]
        batches.reverse()

        async def worker() -> None:
            while batches and time.monotonic() < deadline:
                await send(batches.pop())

        await asyncio.gather(*(worker() for _ in range(int(spec.get("concurrency", 4)))))

    async def stream() -> None:
        size = int(spec.get("batch", 50))
        count = int(spec["count"])
        workers = max(1, min(int(spec.get("concurrency", 4)), len(topics)))
        next_seq = 0

        async def worker(owned: list[str]) -> None:
            nonlocal next_seq
            for topic in itertools.cycle(owned):
                if next_seq >= count or time.monotonic() >= deadline:
                    return
                seqs = range(next_seq, min(count, next_seq + size))
                next_seq = seqs.stop
                await send([(topic, seq) for seq in seqs])

        await asyncio.gather(*(worker(topics[w::workers]) for w in range(workers)))

    await start()
    first = time.time_ns()
    cpu0 = time.process_time()
    try:
        if spec["mode"] == "stream":
            await stream()
        elif spec["mode"] == "rate":
            rate = float(spec["rate"])
            count = int(spec["count"])
            t0 = time.monotonic()
            seq = 0
            while seq < count and time.monotonic() < deadline:
                delay = t0 + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                due = min(count, int((time.monotonic() - t0) * rate) + 1)  # every event whose time has come
                await send([(topics[n % len(topics)], n) for n in range(seq, max(due, seq + 1))])
                seq = max(due, seq + 1)
        else:
            total = max(1, int(spec.get("rounds", 1)))
            for r in range(total):
                if time.monotonic() >= deadline:
                    break
                before = published
                round_first = time.time_ns()
                await burst(r * len(topics))
                rounds.append({"round": r, "first_ns": round_first, "last_ns": time.time_ns(),
                               "published": published - before})
                if r + 1 < total and between is not None:
                    await between(rounds[-1])
    finally:
        last = time.time_ns()
        cpu = time.process_time() - cpu0
        await close()
    seconds = (last - first) / 1e9
    return {"published": published, "errors": errors, "first_ns": first, "last_ns": last, "seconds": seconds,
            "rate": (published - 1) / seconds if published > 1 and seconds > 0 else None,
            "rounds": rounds or None, "cpu_s": cpu}


async def main() -> None:
    """Run one spec, synchronised with the bench through stdin and stdout."""
    loop = asyncio.get_running_loop()
    spec = orjson.loads(await loop.run_in_executor(None, sys.stdin.readline))

    async def start() -> None:
        print("ready", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit("publisher: expected 'go'")

    async def between(stats: dict[str, Any]) -> None:
        print("round " + orjson.dumps(stats).decode(), flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit("publisher: expected 'go'")

    stats = await run(spec, start, between)
    print(orjson.dumps(stats).decode(), flush=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
