"""The ``herald`` command, run as real processes on loopback (``python -m herald``, as its script does).

Every test serves a tiny domain that is not the chat: ``cli_orders.py``, written to a temporary
directory on the subprocesses' ``PYTHONPATH``, with one command (``POST /orders`` →
``OrderPlaced``), its handler (``OrderConfirmed`` on ``orders/{id}`` and ``orders/feed``, then a
success located at ``/orders/{id}``) and two read routes. Redis, where a test needs it, is the
session's private ``redis-server``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
import websockets

from herald.client import SSEParser
from herald.loading import is_factory
from herald.protocol import parse_cursor
from herald.worker.targets import LoadError, load_worker_spec
from tests.support.server import ROOT, TEST_SECRET, HeraldServer, free_port
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

MODULE = "cli_orders"
DOMAIN = f"{MODULE}:orders"
DOMAIN_SOURCE = '''\
"""A domain for the CLI's tests: orders, confirmed by their handler."""

from starlette.requests import Request
from starlette.responses import JSONResponse

import asyncio

from herald import Context, Domain, Gateway

SCHEMA = {"type": "object", "required": ["item", "qty"], "additionalProperties": False,
          "properties": {"item": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}
orders = Domain("orders")
orders.topic("orders/{id}", subscribe="token")
orders.topic("orders/feed", subscribe="token")


@orders.command("POST", "/orders", event="OrderPlaced", schema=SCHEMA)
def place(params: dict, body: dict) -> dict:
    return {"item": body["item"], "qty": body["qty"]}


@orders.handler("OrderPlaced")
async def confirm(ctx: Context) -> None:
    order = {"id": ctx.operation_id, **ctx.data}
    ctx.stage("OrderConfirmed", order, topics=[f"orders/{ctx.operation_id}", "orders/feed"])
    await ctx.succeed(order, location=f"/orders/{ctx.operation_id}")


@orders.command("POST", "/slow-orders", event="SlowOrderPlaced",
                schema={"type": "object", "properties": {"seconds": {"type": "number", "maximum": 10}}})
def place_slowly(params: dict, body: dict) -> dict:
    return body


@orders.handler("SlowOrderPlaced")
async def confirm_slowly(ctx: Context) -> None:
    await ctx.progress({"sleeping": ctx.data["seconds"]})
    await asyncio.sleep(ctx.data["seconds"])
    await ctx.succeed({"slept": ctx.data["seconds"]}, location=f"/orders/{ctx.operation_id}")


@orders.route("GET", "/orders/{id}")
async def read(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["id"]})


@orders.route("GET", "/orders")
async def feed(request: Request) -> JSONResponse:
    """Where to follow every order: the feed's subscribe URLs, with a token."""
    return JSONResponse(Gateway.of(request).topic_urls(request, ["orders/feed"]))
'''

# Timeouts
RUN_TIMEOUT = 30.0
STREAM_TIMEOUT = 10.0
LINE_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def domain_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``cli_orders.py``."""
    path = tmp_path_factory.mktemp("cli-domain")
    (path / f"{MODULE}.py").write_text(DOMAIN_SOURCE)
    return path


def clean_env(domain_path: Path, **extra: str) -> dict[str, str]:
    """This environment without Herald's variables, the domain on ``PYTHONPATH``, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT") and not k.startswith("HERALD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(domain_path), str(ROOT)])
    env.update(extra)
    return env


def herald(*args: str) -> list[str]:
    """The command line of ``herald <args>``."""
    return [sys.executable, "-m", "herald", *args]


def run(args: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command to its end, output captured."""
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def json_lines(text: str) -> list[Any]:
    """Every line of ``text`` decoded as JSON."""
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def cursor_key(cursor: str) -> tuple[int, int]:
    """A cursor's position as numbers (its epoch aside), to compare positions."""
    return parse_cursor(cursor)


def serve_domain(domain_path: Path, port: int | None = None, **env: str) -> HeraldServer:
    """``herald serve --domain cli_orders:orders`` (not started)."""
    return HeraldServer({"PYTHONPATH": os.pathsep.join([str(domain_path), str(ROOT)]), **env},
                        port=port, target=("--domain", DOMAIN))


@pytest.fixture(scope="module")
def gateway(domain_path: Path) -> Iterator[HeraldServer]:
    """The domain served on the embedded default (memory broker, handlers in-process)."""
    server = serve_domain(domain_path).start()
    try:
        yield server
    finally:
        server.stop()


class LineReader:
    """The stdout lines of a running process, each read with a bounded wait."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = LINE_TIMEOUT) -> Any:
        """The next line as JSON; ``EOFError`` when the process closed its output."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout}s") from None
        if line is None:
            raise EOFError("the process closed its output")
        return orjson.loads(line)


# serve -------------------------------------------------------------------------------

async def test_serve_domain_accepts_a_command_streams_it_and_redirects(gateway: HeraldServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5.0) as client:
        accepted = await client.post("/orders", json={"item": "tea", "qty": 2})
        assert accepted.status_code == 202, accepted.text
        op = accepted.json()
        async with sse_connect(client, op["subscribe_url"], timeout=STREAM_TIMEOUT) as stream:
            assert stream.response.status_code == 200
            blocks = [b for b in await stream.until_end(timeout=STREAM_TIMEOUT) if b.is_message]
        types = [b.event for b in blocks]
        assert "OrderConfirmed" in types
        assert types[-1] == "herald.operation.succeeded"
        assert blocks[types.index("OrderConfirmed")].json()["data"] == {"id": op["id"], "item": "tea", "qty": 2}

        done = await client.get(op["operation_url"])
        assert done.status_code == 303
        assert done.headers["location"] == f"/orders/{op['id']}"
        assert (await client.get(done.headers["location"])).json() == {"id": op["id"]}


@pytest.mark.parametrize(("target", "env", "message"), [
    (DOMAIN, {"HERALD_EMBEDDED_WORKER": "maybe"}, "HERALD_EMBEDDED_WORKER must be one of"),
    (DOMAIN, {"REDIS_URL": "redis://127.0.0.1:1/0"}, "HERALD_SECRET is required with REDIS_URL"),
    (DOMAIN, {"HERALD_LOG_LEVEL": "chatty"}, "HERALD_LOG_LEVEL must be"),
    (f"{MODULE}:nothing", {}, f"module '{MODULE}' has no attribute 'nothing'"),
    ("no_such_module:orders", {}, "cannot import 'no_such_module'"),
    (f"{MODULE}:SCHEMA", {}, "is not a herald.Domain"),
], ids=["bad-bool", "redis-without-secret", "bad-log-level", "no-attribute", "no-module", "not-a-domain"])
def test_serve_refuses_a_bad_target_or_setting_in_one_line(
    domain_path: Path, target: str, env: dict[str, str], message: str
) -> None:
    done = run(herald("serve", "--domain", target, "--port", str(free_port())), clean_env(domain_path, **env))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("herald serve: ")
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_serve_app_refuses_a_domain_and_asks_for_domain(domain_path: Path) -> None:
    done = run(herald("serve", "--app", DOMAIN, "--port", str(free_port())), clean_env(domain_path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"herald serve: {DOMAIN} is a herald.Domain: use --domain {DOMAIN}"


async def test_serve_cuts_websocket_messages_above_the_limit_before_the_app_reads_them(domain_path: Path) -> None:
    limit = 1024
    with serve_domain(domain_path, HERALD_MAX_WS_MESSAGE=str(limit)) as server:
        async with websockets.connect(server.ws_url + "/ws", max_size=None, open_timeout=5) as ws:
            frame = orjson.dumps({"type": "ping", "id": ""})
            at_limit = orjson.dumps({"type": "ping", "id": "x" * (limit - len(frame))})
            assert len(at_limit) == limit
            await ws.send(at_limit.decode())
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"

            await ws.send(orjson.dumps({"type": "ping", "id": "x" * (limit - len(frame) + 1)}).decode())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
    received = closed.value.rcvd
    assert received is not None and received.code == 1009
    # the server's frame limit (uvicorn's ws_max_size), not the app's own check after reading it
    assert "messages are limited" not in received.reason


# worker ------------------------------------------------------------------------------

@pytest.mark.redis
async def test_worker_completes_what_a_gateway_on_the_same_redis_accepted(domain_path: Path, redis_url: str) -> None:
    with serve_domain(domain_path, REDIS_URL=redis_url) as server:  # no embedded worker with Redis
        async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
            ops = [(await client.post("/orders", json={"item": item, "qty": 1})).json() for item in ("tea", "jam")]
            assert [op["status"] for op in ops] == ["pending", "pending"]

            env = clean_env(domain_path, REDIS_URL=redis_url, HERALD_SECRET=TEST_SECRET)
            done = run(herald("worker", DOMAIN, "--burst"), env)  # --burst: exits once no work is left
            assert done.returncode == 0, done.stderr

            for op in ops:
                finished = await client.get(op["operation_url"])
                assert finished.status_code == 303, finished.text
                assert finished.headers["location"] == f"/orders/{op['id']}"
                async with sse_connect(client, op["subscribe_url"], timeout=STREAM_TIMEOUT) as stream:
                    blocks = [b for b in await stream.until_end(timeout=STREAM_TIMEOUT) if b.is_message]
                confirmed = [b.json() for b in blocks if b.event == "OrderConfirmed"]
                assert len(confirmed) == 1
                assert confirmed[0]["source"].startswith("herald.worker/")
                assert confirmed[0]["source"] != "herald.worker/embedded"

            # `python -m herald.worker` is the same worker
            third = (await client.post("/orders", json={"item": "oat", "qty": 3})).json()
            done = run([sys.executable, "-m", "herald.worker", DOMAIN, "--burst"], env)
            assert done.returncode == 0, done.stderr
            assert (await client.get(third["operation_url"])).status_code == 303


def test_worker_refuses_to_start_without_redis(domain_path: Path) -> None:
    done = run(herald("worker", DOMAIN, "--burst"), clean_env(domain_path))
    assert done.returncode == 2
    assert "needs REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr


# check -------------------------------------------------------------------------------

@pytest.mark.redis
def test_check_passes_with_a_reachable_redis(domain_path: Path, redis_url: str) -> None:
    done = run(herald("check", "--domain", DOMAIN),
               clean_env(domain_path, REDIS_URL=redis_url, HERALD_SECRET=TEST_SECRET))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "ok settings", f"ok domain {DOMAIN} (2 commands, 2 handlers)", f"ok broker {redis_url}",
    ]


def test_check_fails_on_a_redis_nobody_listens_on_and_hides_its_password(domain_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    done = run(herald("check", "--redis-url", url, "--timeout", "3"), clean_env(domain_path, HERALD_SECRET=TEST_SECRET))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "ok settings"
    assert lines[1].startswith(f"FAIL broker {url.replace('hunter2', '***')}: ")
    assert "hunter2" not in done.stdout + done.stderr


def test_check_reports_bad_settings_with_status_2(domain_path: Path) -> None:
    done = run(herald("check"), clean_env(domain_path, HERALD_MAX_BODY="lots"))
    assert done.returncode == 2
    assert done.stdout.strip() == "FAIL settings: HERALD_MAX_BODY must be an integer, got 'lots'"


# submit ------------------------------------------------------------------------------

def test_submit_follow_prints_the_operation_and_its_events_to_the_end(domain_path: Path,
                                                                      gateway: HeraldServer) -> None:
    done = run(herald("submit", "POST", "/orders", '{"item": "tea", "qty": 2}', "--url", gateway.url, "--follow",
                      "--idempotency-key", "cli-follow-1"), clean_env(domain_path))
    assert done.returncode == 0, done.stdout + done.stderr
    body, *events = json_lines(done.stdout)
    assert body["status"] == "pending" and body["operation_url"] == f"/operations/{body['id']}"
    assert {e["type"] for e in events} == {"event"}
    assert {e["topic"] for e in events} == {f"operations/{body['id']}"}
    types = [e["event"]["type"] for e in events]
    assert "OrderConfirmed" in types
    assert types[-1] == "herald.operation.succeeded"
    assert events[-1]["event"]["data"]["location"] == f"/orders/{body['id']}"
    cursors = [cursor_key(e["cursor"]) for e in events]
    assert cursors == sorted(set(cursors))

    again = run(herald("submit", "POST", "/orders", '{"item": "tea", "qty": 2}', "--url", gateway.url,
                       "--idempotency-key", "cli-follow-1"), clean_env(domain_path))
    assert again.returncode == 0
    assert json_lines(again.stdout)[0]["id"] == body["id"]


def test_submit_follow_outlives_its_subscribe_token(domain_path: Path) -> None:
    """The stream ends when its token expires; submit fetches a fresh URL from the operation and resumes."""
    with serve_domain(domain_path, HERALD_TOKEN_TTL="1") as server:
        done = run(herald("submit", "POST", "/slow-orders", '{"seconds": 3}', "--url", server.url, "--follow"),
                   clean_env(domain_path))
    assert done.returncode == 0, done.stdout + done.stderr
    _, *events = json_lines(done.stdout)
    types = [e["event"]["type"] for e in events]
    assert types == ["herald.operation.running", "herald.operation.progress", "herald.operation.succeeded"]
    assert events[-1]["event"]["data"]["result"] == {"slept": 3}


def test_submit_prints_the_problem_of_a_refused_command_and_exits_2(domain_path: Path,
                                                                   gateway: HeraldServer) -> None:
    done = run(herald("submit", "POST", "/orders", '{"item": "tea", "qty": 0}', "--url", gateway.url, "--follow"),
               clean_env(domain_path))
    assert done.returncode == 2
    [problem] = json_lines(done.stdout)
    assert problem["status"] == 422 and problem["field"] == "qty"
    assert done.stderr.startswith("herald submit: HTTP 422: ")


def test_submit_refuses_a_body_that_is_not_json(domain_path: Path, gateway: HeraldServer) -> None:
    done = run(herald("submit", "POST", "/orders", "{item: tea}", "--url", gateway.url), clean_env(domain_path))
    assert done.returncode == 2
    assert done.stderr.startswith("herald submit: BODY is not JSON")
    assert done.stdout == ""


# tail --------------------------------------------------------------------------------

@pytest.mark.redis
def test_tail_resumes_after_its_gateway_died_and_prints_every_event_once_in_order(
    domain_path: Path, redis_url: str
) -> None:
    # the tail follows gateway `followed`; orders go to `front`, whose embedded worker runs them
    followed = serve_domain(domain_path, REDIS_URL=redis_url).start()
    front = serve_domain(domain_path, REDIS_URL=redis_url, HERALD_EMBEDDED_WORKER="1").start()
    tail: subprocess.Popen[str] | None = None
    placed: list[str] = []

    def place(count: int) -> None:
        for _ in range(count):
            reply = httpx.post(front.url + "/orders", json={"item": "tea", "qty": len(placed) + 1},
                               headers={"Prefer": "wait=5"}, timeout=10)
            assert reply.status_code == 200 and reply.json()["status"] == "succeeded", reply.text
            placed.append(reply.json()["id"])

    try:
        env = clean_env(domain_path)
        refused = run(herald("tail", "orders/feed", "--url", followed.url), env)
        assert refused.returncode == 2
        assert json_lines(refused.stdout)[0]["status"] == 401

        token = parse_qs(urlsplit(httpx.get(front.url + "/orders").json()["subscribe_url"]).query)["token"][0]
        tail = subprocess.Popen(herald("tail", "orders/feed", "--url", followed.url, "--token", token,
                                       "--cursor", "0-0", "--max-events", "7"),
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tail.stdout is not None
        lines = LineReader(tail.stdout)
        place(3)
        printed = [lines.next() for _ in range(3)]

        followed.kill()  # the tail's connection drops with no goodbye
        place(3)  # while nobody serves the tail
        followed = serve_domain(domain_path, port=followed.port, REDIS_URL=redis_url).start()
        place(1)
        printed += [lines.next() for _ in range(4)]
        assert tail.wait(timeout=LINE_TIMEOUT) == 0
        with pytest.raises(EOFError):
            lines.next()
        assert tail.stderr is not None
        assert "reconnecting" in tail.stderr.read()
    finally:
        if tail is not None and tail.poll() is None:
            tail.send_signal(signal.SIGKILL)
            tail.wait(5)
        followed.stop()
        front.stop()

    assert [p["type"] for p in printed] == ["event"] * 7
    assert [p["event"]["data"]["id"] for p in printed] == placed
    assert [p["event"]["type"] for p in printed] == ["OrderConfirmed"] * 7
    assert {p["topic"] for p in printed} == {"orders/feed"}
    cursors = [cursor_key(p["cursor"]) for p in printed]
    assert cursors == sorted(set(cursors))


# the pieces, without processes ---------------------------------------------------------

def test_sse_parser_dispatches_blocks_and_keeps_the_last_id_as_an_event_source_does() -> None:
    parser = SSEParser()
    stream = (b"retry: 2000\n\nid: 5-0\n\n:\n\n"
              b"id: 6-0\r\nevent: A\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
              b"event: B\rdata: x\r\r:\n")
    messages = [m for i in range(len(stream)) for m in parser.feed(stream[i : i + 1])]  # byte by byte
    assert [(m.event, m.data, m.id) for m in messages] == [("A", '{"a":\n1}', "6-0"), ("B", "x", "6-0")]
    assert parser.retry_ms == 2000
    assert parser.last_event_id == "6-0"

    cut = SSEParser(last_event_id="6-0")
    assert cut.feed(b"id: 7-0\ndata: half") == []
    assert cut.last_event_id == "6-0"  # a block the connection lost halfway is not resumed after


def test_an_app_factory_is_told_from_an_asgi_app() -> None:
    async def asgi(scope: Any, receive: Any, send: Any) -> None: ...

    def factory(settings: Any = None) -> Any: ...

    assert not is_factory(asgi)
    assert is_factory(factory)


def test_worker_targets_are_a_domain_a_list_of_them_or_a_settings_class(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cli_targets.py").write_text(
        "from herald import Domain, WorkerSettings\n"
        "a, b, again = Domain('a'), Domain('b'), Domain('again')\n"
        "both, clash = [a, b], [a, again]\n"
        "async def handle(ctx): ...\n"
        "a.handler('A')(handle); b.handler('B')(handle); again.handler('A')(handle)\n"
        "class Settings(WorkerSettings):\n    handlers = {'C': handle}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert set(load_worker_spec("cli_targets:a").handlers) == {"A"}
    assert set(load_worker_spec("cli_targets:both").handlers) == {"A", "B"}
    assert set(load_worker_spec("cli_targets:Settings").handlers) == {"C"}
    with pytest.raises(LoadError, match="A has handlers in two domains"):
        load_worker_spec("cli_targets:clash")
