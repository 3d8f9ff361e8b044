"""What the scenarios need to know of each server under test: how to start it and its URLs.

Every target is reached only on the loopback interface. Topic names avoid ``/`` so that every
target can use them as they are (Herald's chat rooms are the one exception: ``chats/{room}``).
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import jwt
import orjson

from bench import servers
from bench.servers import RedisServer, Target
from herald.auth import TokenSigner


class TargetKind:
    """A kind of server under test."""

    name = ""
    supports_commands = True
    publish_api = False
    """Whether events can be published to it over HTTP (scenario P)."""

    def start(self, workdir: Path, redis: RedisServer, *, commands: bool = False) -> Target:
        """Start a fresh server on the bench's Redis."""
        raise NotImplementedError

    def sse_path(self, topic: str) -> str:
        """The path that opens an SSE stream of ``topic``."""
        raise NotImplementedError

    def ws_path(self, topic: str) -> str:
        """The path that opens a WebSocket following ``topic``."""
        raise NotImplementedError

    ws_ready_on_message: bool = True
    """Whether the WebSocket is subscribed only once a first message says so (else at the 101)."""

    def room_path(self, room: str) -> str:
        """Scenario D: the SSE stream on which a room's correlated events arrive."""
        raise NotImplementedError

    def publish_request(self, topic: str) -> tuple[str, dict[str, str]]:
        """Scenario P: the path and headers of a request that publishes one event (its body) to ``topic``."""
        raise NotImplementedError

    def publish_body(self, topic: str, event: bytes) -> tuple[bytes, str]:
        """Scenario P: the body and content type of that request for one event's JSON (the JSON itself, here)."""
        return event, "application/json"

    def command(self, room: str, seq: int) -> tuple[str, bytes]:
        """Scenario D: the path and body of one command for ``room``."""
        raise NotImplementedError

    @staticmethod
    def operation_id(body: bytes) -> str:
        """Scenario D: the operation id in a 202's body."""
        return str(orjson.loads(body)["id"])


class Herald(TargetKind):
    """Herald: one gateway process and one worker process on the bench's Redis."""

    name = "herald"
    publish_api = True

    def __init__(self) -> None:
        self.signer = TokenSigner(servers.SECRET, ttl=3600)

    def start(self, workdir: Path, redis: RedisServer, *, commands: bool = False) -> Target:
        return servers.start_herald(workdir, redis)

    def sse_path(self, topic: str) -> str:
        return f"/topics/{quote(topic, safe='/')}/events?token={self.signer.issue([topic])}"

    def ws_path(self, topic: str) -> str:
        return f"/ws?topic={quote(topic, safe='/')}&token={self.signer.issue([topic])}"

    def room_path(self, room: str) -> str:
        return self.sse_path(f"chats/{room}")

    def publish_request(self, topic: str) -> tuple[str, dict[str, str]]:
        token = jwt.encode({"sub": "bench-warm-up", "exp": int(time.time()) + 3600, "herald": {"publish": ["**"]}},
                           servers.SECRET, "HS256")
        return f"/topics/{quote(topic, safe='/')}/events", {"Authorization": f"Bearer {token}"}

    def command(self, room: str, seq: int) -> tuple[str, bytes]:
        return f"/chats/{room}/messages", orjson.dumps({"author": "bench", "text": f"message {seq}"})


class Naive(TargetKind):
    """The naive gateway of :mod:`bench.baselines.naive`."""

    name = "naive"

    def start(self, workdir: Path, redis: RedisServer, *, commands: bool = False) -> Target:
        return servers.start_naive(workdir, redis, worker=commands)

    def sse_path(self, topic: str) -> str:
        return f"/sse/{topic}"

    def ws_path(self, topic: str) -> str:
        return f"/ws/{topic}"

    def room_path(self, room: str) -> str:
        return self.sse_path(room)

    def command(self, room: str, seq: int) -> tuple[str, bytes]:
        return f"/commands/{room}", orjson.dumps({"author": "bench", "text": f"message {seq}"})


class Nchan(TargetKind):
    """nginx + nchan with Redis storage; it has no commands (scenario D is not applicable)."""

    name = "nchan"
    supports_commands = False
    publish_api = True
    ws_ready_on_message = False

    def start(self, workdir: Path, redis: RedisServer, *, commands: bool = False) -> Target:
        return servers.start_nchan(workdir, redis)

    def sse_path(self, topic: str) -> str:
        return f"/sub/{topic}"

    def ws_path(self, topic: str) -> str:
        return f"/sub/{topic}"

    def publish_request(self, topic: str) -> tuple[str, dict[str, str]]:
        return f"/pub/{topic}", {}


def make_targets(names: list[str]) -> list[TargetKind]:
    """The targets named, in the order given; nchan is left out when it is not installed."""
    kinds: dict[str, type[TargetKind]] = {"herald": Herald, "naive": Naive, "nchan": Nchan}
    out: list[TargetKind] = []
    for name in names:
        if name not in kinds:
            raise SystemExit(f"unknown target {name!r}; expected some of {', '.join(kinds)}")
        if name == "nchan" and not servers.nchan_available():
            print("bench: nchan is not installed (libnginx-mod-nchan); leaving it out")
            continue
        out.append(kinds[name]())
    return out
