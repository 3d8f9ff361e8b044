"""The kernel's share of one delivery: CPU per write of an SSE-sized chunk to a loopback TCP socket.

``python -m bench.floor`` opens ``connections`` loopback TCP connections, forks a reader that
drains all of them, and writes one ``size``-byte chunk to every connection, ``rounds`` times with
a short pause between rounds (as scenario C does). It prints one JSON line: the writer's CPU
microseconds per write (user and system, from ``os.times``).

Every push server pays at least this per delivery to a distinct connection, whatever its
language: it is the floor under scenario C's "server CPU µs / delivery", measured on the same
machine in the same run, so the bench can say how much of a server's cost is its own code.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import time

import orjson


def measure(connections: int = 2000, rounds: int = 10, size: int = 320, pause: float = 0.05) -> dict[str, float]:
    """Write ``rounds`` x ``connections`` chunks; the writer's CPU per write, in µs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    port = server.getsockname()[1]
    readers, writers = [], []
    for _ in range(connections):
        readers.append(socket.create_connection(("127.0.0.1", port)))
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn sets it
        writers.append(conn)
    server.close()
    total = connections * rounds * size
    pid = os.fork()
    if pid == 0:  # the reader: drain every connection until all bytes are in, or 30 s
        try:
            sel = selectors.DefaultSelector()
            for r in readers:
                r.setblocking(False)
                sel.register(r, selectors.EVENT_READ)
            got, end = 0, time.monotonic() + 30
            while got < total and time.monotonic() < end:
                for key, _ in sel.select(1):
                    got += len(key.fileobj.recv(65536))  # type: ignore[union-attr]
        finally:
            os._exit(0)
    for r in readers:
        r.close()
    chunk = b"x" * size
    time.sleep(0.2)
    before = os.times()
    for _ in range(rounds):
        for w in writers:
            w.send(chunk)
        time.sleep(pause)
    after = os.times()
    os.waitpid(pid, 0)
    for w in writers:
        w.close()
    writes = connections * rounds
    user, system = after.user - before.user, after.system - before.system
    return {"connections": connections, "rounds": rounds, "size": size,
            "us_per_write": round((user + system) / writes * 1e6, 2),
            "user_us_per_write": round(user / writes * 1e6, 2),
            "system_us_per_write": round(system / writes * 1e6, 2)}


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    print(orjson.dumps(measure(args.connections, args.rounds, args.size)).decode(), flush=True)


if __name__ == "__main__":
    main()
