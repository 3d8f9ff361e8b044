"""The ``herald`` command: serve a gateway, run a worker, check a setup, and a terminal client.

::

    herald serve --domain pkg.mod:orders [--domain …] [--host H] [--port N] [--redis-url URL] [--static DIR]
    herald serve --app pkg.mod:create_app          # an app built with herald.create_app, or a factory of one
    herald serve --config herald.toml              # commands forwarded to upstream HTTP services (docs/proxy.md)
    herald worker pkg.mod:orders [--burst] [--concurrency N]
    herald worker --config herald.toml             # the workers that forward those commands
    herald check [--domain …|--app …|--config …] [--redis-url URL]
    herald submit POST /orders '{"item": "tea", "qty": 2}' [--url URL] [--follow]
    herald tail orders/42 --token T [--cursor C] [--max-events N]

``serve`` runs uvicorn with everything Herald wants built in: uvloop, Herald's HTTP protocol
(:mod:`herald.http.fastwrite`), the sans-I/O WebSocket protocol, ``HERALD_MAX_WS_MESSAGE`` as the
WebSocket frame limit, proxy headers, a bounded graceful shutdown. Settings come from the
environment (:class:`~herald.Settings`); ``--redis-url`` overrides ``REDIS_URL``.

``submit`` and ``tail`` print one JSON object per line: the operation body, then one
``{"type": "event", "topic", "cursor", "event"}`` per event (``{"type": "gap", …}`` when the
server no longer holds events after a cursor), the shapes of the WebSocket protocol. A dropped
stream is resumed with ``Last-Event-ID``, so nothing is printed twice or skipped.

Exit statuses: 0 done; 1 a check failed, or the operation failed or was canceled; 2 a usage or
configuration error (one line on stderr, no traceback) or a ``4xx`` answer (its problem
printed); 3 the server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import orjson
import uvicorn
import uvicorn.config

from herald.app import create_app
from herald.broker import create_broker
from herald.broker.base import BrokerError
from herald.client import Message, Reply, StreamRefused, follow, request
from herald.domain import Catalog, DomainError
from herald.http.fastwrite import HttpToolsProtocol, WebSocketProtocol
from herald.loading import LoadError, load_app, load_domains
from herald.logs import configure_logging
from herald.protocol import STATUS_EVENT_PREFIX
from herald.proxy.config import ConfigError as ProxyConfigError
from herald.proxy.config import load_config
from herald.settings import Settings, SettingsError
from herald.worker import WorkerSettings
from herald.worker.__main__ import add_arguments, run_loop, work

DEFAULT_PORT = 8000
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded": 0, "failed": 1, "canceled": 1}
"""An operation's terminal statuses and the exit status ``herald submit --follow`` ends with."""

# Timeouts
GRACEFUL_SHUTDOWN = 10
"""Seconds ``serve`` lets open connections finish on SIGTERM (push clients are told to reconnect at once)."""
CHECK_TIMEOUT = 5.0
"""Seconds ``check`` waits for the broker."""

ConfigError = (LoadError, SettingsError, DomainError, ProxyConfigError)
"""What a wrong command line or environment raises: reported in one line, exit status 2."""


class UsageError(Exception):
    """A command line that cannot work, found after parsing (reported in one line, exit status 2)."""


def fail(command: str, error: object, status: int = 2) -> int:
    """Print ``herald <command>: <error>`` on stderr; ``status``."""
    print(f"herald {command}: {error}", file=sys.stderr)
    return status


def emit(doc: Any) -> None:
    """Print ``doc`` as one JSON line, at once (the reader may be a pipe)."""
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with ``--redis-url`` in place of ``REDIS_URL`` when given."""
    env = dict(os.environ)
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    return Settings.from_env(env)


def hide_password(url: str) -> str:
    """``url`` with the password of its userinfo (and any ``password=`` parameter) replaced by ``***``."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


# serve -------------------------------------------------------------------------------

def serve(args: argparse.Namespace) -> int:
    """``herald serve``: build the app and run it under uvicorn until stopped."""
    try:
        settings = load_settings(args)
        port = args.port if args.port is not None else _port_from_env()
        log_level = _log_level(settings)
        app = build_app(args, with_callback_url(settings, args.host, port))
    except (*ConfigError, UsageError) as exc:
        return fail("serve", exc)
    config = uvicorn.Config(app, **server_options(args, settings, port=port, log_level=log_level))
    configure_logging(settings.log_level)  # uvicorn.Config has just set up its loggers: Herald's JSON lines again
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3


def build_app(args: argparse.Namespace, settings: Settings) -> Callable[..., Any]:
    """The app ``serve`` runs: ``create_app`` over the ``--domain`` targets, or the ``--app`` one."""
    if args.app is not None:
        if args.static is not None:
            raise UsageError("--static goes with --domain or --config; an --app serves what it was built with")
        return load_app(args.app, settings, settings_required=bool(args.redis_url))
    if args.config is not None:
        domains = [load_config(args.config)]
    else:
        domains = [domain for path in args.domain for domain in load_domains(path)]
    if args.static is not None and not Path(args.static).is_dir():
        raise UsageError(f"--static {args.static}: no such directory")
    return create_app(settings, domains=domains, static=args.static)


def with_callback_url(settings: Settings, host: str, port: int) -> Settings:
    """``settings`` with this server as ``HERALD_CALLBACK_URL`` when neither it nor ``HERALD_PUBLIC_URL`` is set.

    For the embedded worker only: it forwards proxied commands from this very process, so upstreams call
    back where it listens. Workers of their own (with Redis) need the variable set.
    """
    if settings.callback_url or settings.public_url or not settings.embedded_worker:
        return settings
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    return dataclasses.replace(settings, callback_url=f"http://{shown}:{port}")


def server_options(args: argparse.Namespace, settings: Settings, *, port: int, log_level: int) -> dict[str, Any]:
    """uvicorn's options for Herald: what ``herald serve`` builds in so nobody copies a long uvicorn line."""
    return {
        "host": args.host,
        "port": port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        # the class with this process's header timeout (uvicorn makes one protocol object per connection)
        "http": type("HttpToolsProtocol", (HttpToolsProtocol,), {"header_timeout": settings.header_timeout}),
        # uvicorn's websockets-sansio protocol, lighter per socket and with a direct write (herald/http/fastwrite.py)
        "ws": WebSocketProtocol if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "websockets",
        "ws_max_size": settings.max_ws_message,
        "lifespan": "on",
        "proxy_headers": True,
        "timeout_graceful_shutdown": args.timeout_graceful_shutdown,
        "backlog": args.backlog,
        "access_log": args.access_log,
        "log_level": log_level,
    }


def _port_from_env() -> int:
    raw = os.environ.get("PORT", "")
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"PORT must be a TCP port number, got {raw!r}")
    return int(raw)


def _log_level(settings: Settings) -> int:
    """``HERALD_LOG_LEVEL`` as a number, for uvicorn's loggers too (one knob for the whole process)."""
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise SettingsError(f"HERALD_LOG_LEVEL must be debug, info, warning, error or critical, "
                            f"got {settings.log_level!r}")
    return level


# worker ------------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> int:
    """``herald worker``: the worker of :mod:`herald.worker.__main__`, or of a proxy config file's commands."""
    if args.config is None:
        return run_loop(work(args))
    if args.target is not None:
        return fail("worker", "give a target or --config, not both")
    try:
        domain = load_config(args.config)
    except ProxyConfigError as exc:
        return fail("worker", exc)
    spec = type("ConfigWorkerSettings", (WorkerSettings,), {"handlers": domain.handlers})
    return run_loop(work(args, spec))


# check -------------------------------------------------------------------------------

def check(args: argparse.Namespace) -> int:
    """``herald check``: one line per check on stdout; non-zero if any failed."""
    try:
        settings = load_settings(args)
        _log_level(settings)
    except SettingsError as exc:
        print(f"FAIL settings: {exc}")
        return 2
    print("ok settings")
    passed = True
    for path in args.domain or ():
        passed &= _report(f"domain {path}", functools.partial(_check_domains, path))
    if args.config is not None:
        passed &= _report(f"config {args.config}", functools.partial(_check_config, args.config))
    if args.app is not None:
        passed &= _report(f"app {args.app}", functools.partial(_check_app, args, settings))
    configure_logging("error")  # the broker's own warnings would repeat what its line says
    broker_ok, line = asyncio.run(check_broker(settings, args.timeout))
    print(line)
    return 0 if passed and broker_ok else 1


def _report(what: str, attempt: Callable[[], str]) -> bool:
    try:
        note = attempt()
    except ConfigError as exc:
        print(f"FAIL {what}: {exc}")
        return False
    print(f"ok {what}{note}")
    return True


def _check_domains(path: str) -> str:
    catalog = Catalog.of(load_domains(path))
    return f" ({len(catalog.commands)} commands, {len(catalog.handlers)} handlers)"


def _check_config(path: str) -> str:
    domain = load_config(path)
    return f" ({len(domain.commands)} commands, {len(domain.proxy_routes)} routes, {len(domain.topics)} topics)"


def _check_app(args: argparse.Namespace, settings: Settings) -> str:
    load_app(args.app, settings, settings_required=bool(args.redis_url))
    return ""


async def check_broker(settings: Settings, timeout: float) -> tuple[bool, str]:
    """Start the configured broker, ping it and close it within ``timeout`` s; the verdict and its line."""
    shown = hide_password(settings.redis_url) if settings.redis_url else "memory:// (embedded; REDIS_URL is unset)"
    try:
        broker = create_broker(settings.redis_url, **settings.broker_options())
    except ValueError as exc:
        return False, f"FAIL broker {shown}: {exc}"
    reason = f"no answer within {timeout:g}s"
    alive = False
    try:
        async with asyncio.timeout(timeout):
            await broker.start()
            alive = await broker.ping()
            if not alive:
                # ping() only says no; a read says why (connection refused, authentication, ...)
                reason = "no answer to PING"
                await broker.get_operation("herald-check")
    except BrokerError as exc:
        reason = str(exc)
    except TimeoutError:
        pass
    finally:
        try:
            async with asyncio.timeout(timeout):
                await broker.close()
        except TimeoutError:
            pass
    return alive, f"ok broker {shown}" if alive else f"FAIL broker {shown}: {reason}"


# submit ------------------------------------------------------------------------------

def submit(args: argparse.Namespace) -> int:
    """``herald submit``: send a command, print the answer, and with ``--follow`` its events to the end."""
    try:
        body = _body(args.body)
        headers = _headers(args.header, bearer=args.token)
    except UsageError as exc:
        return fail("submit", exc)
    headers["Content-Type"] = "application/json"
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    url = urljoin(args.url.rstrip("/") + "/", args.path.lstrip("/"))
    try:
        reply = request(args.method.upper(), url, headers=headers, body=body)
    except (OSError, ValueError) as exc:
        return fail("submit", f"{url}: {exc}", 1)
    answer = reply.json()
    if reply.status >= 400:
        return _problem("submit", reply)
    emit(answer)
    if not args.follow:
        return 0
    if not isinstance(answer, dict) or "subscribe_url" not in answer:
        return fail("submit", f"HTTP {reply.status} carries no subscribe_url to follow", 1)
    if answer.get("status") in TERMINAL:  # answered finished already (Prefer: wait)
        return TERMINAL[answer["status"]]
    stream_url = urljoin(url, answer["subscribe_url"])
    return _follow_operation(stream_url, urljoin(url, answer["operation_url"]),
                             _same_origin_headers(headers, url, stream_url))


def _follow_operation(stream_url: str, operation_url: str, headers: dict[str, str]) -> int:
    topic = "operations/" + operation_url.rstrip("/").rsplit("/", 1)[-1]

    def fresh_url() -> str:  # the operation hands out a new subscribe token with every read
        reply = request("GET", operation_url + "?view=status", headers=headers)
        if reply.status != 200 or not isinstance(reply.json(), dict):
            return stream_url
        return urljoin(operation_url, str(reply.json().get("subscribe_url", stream_url)))

    try:
        for message in follow(stream_url, headers=headers, on_drop=_note_drop("submit"), refresh=fresh_url):
            _print_message(topic, message)
            status = _terminal_status(message)
            if status is not None:
                return TERMINAL[status]
    except StreamRefused as exc:
        return _problem("submit", exc.reply)
    # 204: the stream was resumed after its terminal event; the operation says how it ended
    reply = request("GET", operation_url + "?view=status", headers=headers)
    if reply.status >= 400:
        return _problem("submit", reply)
    return TERMINAL.get(str((reply.json() or {}).get("status")), 1)


def _terminal_status(message: Message) -> str | None:
    if not message.event.startswith(STATUS_EVENT_PREFIX):
        return None
    status = message.event.removeprefix(STATUS_EVENT_PREFIX)
    return status if status in TERMINAL else None


def _body(raw: str) -> bytes:
    text = sys.stdin.read() if raw == "-" else raw
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"BODY is not JSON: {exc}") from exc
    return text.encode()


def _headers(pairs: Sequence[str] | None, *, bearer: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in pairs or ():
        name, colon, value = pair.partition(":")
        if not colon or not name.strip():
            raise UsageError(f"--header takes Name:value, got {pair!r}")
        headers[name.strip()] = value.strip()
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    return headers


def _same_origin_headers(headers: Mapping[str, str], url: str, other: str) -> dict[str, str]:
    """``headers`` for a request to ``other``: none of them when it is another origin than ``url``."""
    same = urlsplit(url)[:2] == urlsplit(other)[:2]
    return {k: v for k, v in headers.items() if same and k.lower() != "content-type"}


# tail --------------------------------------------------------------------------------

def tail(args: argparse.Namespace) -> int:
    """``herald tail``: print a topic's events as they come, resuming after dropped connections."""
    stream_url = _stream_url(args)
    topic = _topic_of(stream_url)
    count = 0
    try:
        for message in follow(stream_url, cursor=args.cursor, on_drop=_note_drop("tail")):
            if _print_message(topic, message):
                count += 1
                if args.max_events is not None and count >= args.max_events:
                    return 0
    except StreamRefused as exc:
        return _problem("tail", exc.reply)
    except ValueError as exc:
        return fail("tail", exc)
    return 0  # 204: the topic's stream has ended for good


def _stream_url(args: argparse.Namespace) -> str:
    """The SSE URL for ``args.topic``: a topic name, or a subscribe URL as a read route hands it out."""
    base = args.url.rstrip("/") + "/"
    if args.topic.startswith("/") or "://" in args.topic:
        return urljoin(base, args.topic)
    url = urljoin(base, f"topics/{quote(args.topic, safe='/')}/events")
    return f"{url}?token={quote(args.token, safe='')}" if args.token else url


def _topic_of(stream_url: str) -> str | None:
    """The topic a stream URL follows (``None`` for a stream of several)."""
    parts = urlsplit(stream_url)
    found = re.fullmatch(r"/topics/(.+)/events|/(operations/[^/]+)/events", parts.path)
    if found is not None:
        return unquote(found.group(1) or found.group(2))
    topics = parse_qs(parts.query).get("topic", [])
    return topics[0] if len(topics) == 1 else None


# shared by submit and tail ------------------------------------------------------------

def _print_message(topic: str | None, message: Message) -> bool:
    """Print a stream's message as a JSON line; whether it was an event (not a Herald control message)."""
    if message.event == "herald.disconnect":
        print(f"herald: the server asked to reconnect: {message.data}", file=sys.stderr)
        return False
    try:
        data = message.json()
    except orjson.JSONDecodeError:
        data = message.data
    if message.event == "herald.gap":
        emit({"type": "gap", **data} if isinstance(data, dict) else {"type": "gap", "detail": data})
        return False
    emit({"type": "event", "topic": topic, "cursor": message.id, "event": data})
    return True


def _note_drop(command: str) -> Callable[[str, float], None]:
    def note(reason: str, delay: float) -> None:
        print(f"herald {command}: connection lost ({reason}); reconnecting in {delay:.1f}s", file=sys.stderr)

    return note


def _problem(command: str, reply: Reply) -> int:
    """Print the problem an error answer carries (stdout) and a summary (stderr); 2 for a 4xx, else 1."""
    doc = reply.json()
    emit(doc if doc is not None else {"status": reply.status, "body": reply.body.decode(errors="replace")})
    detail = (doc.get("detail") or doc.get("title")) if isinstance(doc, dict) else None
    return fail(command, f"HTTP {reply.status}" + (f": {detail}" if detail else ""),
                2 if 400 <= reply.status < 500 else 1)


# the command line ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``herald`` command line, one subcommand per function above."""
    parser = argparse.ArgumentParser(prog="herald", description="Herald, a real-time push gateway: serve it, "
                                     "run its workers, check a setup, send commands and follow topics.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="serve a gateway (uvicorn, with Herald's options built in)")
    targets = p.add_mutually_exclusive_group(required=True)
    _add_targets(targets)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help=f"port to bind (default: $PORT, else {DEFAULT_PORT})")
    p.add_argument("--redis-url", help="the broker, in place of $REDIS_URL")
    p.add_argument("--static", metavar="DIR", help="a directory served at / (with --domain)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every request (default: on)")
    p.add_argument("--timeout-graceful-shutdown", type=int, default=GRACEFUL_SHUTDOWN, metavar="S",
                   help=f"seconds open connections get to finish on SIGTERM (default: {GRACEFUL_SHUTDOWN})")
    p.add_argument("--backlog", type=int, default=2048, help="pending connections the socket holds (default: 2048)")
    p.set_defaults(run=serve)

    p = commands.add_parser("worker", help="run a domain's handlers against the broker (needs REDIS_URL)",
                            description="Run the handlers of a herald.Domain (or of a settings class) against "
                                        "the broker of REDIS_URL until SIGTERM; --burst exits once no work is left.")
    add_arguments(p)
    p.add_argument("--config", metavar="FILE", help="forward the commands of a proxy config file (herald.toml)")
    p.set_defaults(run=worker)

    p = commands.add_parser("check", help="check the settings, the targets and the broker")
    _add_targets(p.add_mutually_exclusive_group())
    p.add_argument("--redis-url", help="the broker, in place of $REDIS_URL")
    p.add_argument("--timeout", type=float, default=CHECK_TIMEOUT, help="seconds to wait for the broker")
    p.set_defaults(run=check)

    p = commands.add_parser("submit", help="send a command; --follow prints its events to the end")
    p.add_argument("method", metavar="METHOD", help="POST, PUT, PATCH or DELETE")
    p.add_argument("path", metavar="PATH", help="the command's path, e.g. /orders")
    p.add_argument("body", metavar="BODY", help="the JSON body ('-' reads it from stdin)")
    _add_url(p)
    p.add_argument("--header", action="append", metavar="NAME:VALUE", help="a request header (repeatable)")
    p.add_argument("--token", metavar="BEARER", help="a bearer token for the command (HERALD_JWT_*)")
    p.add_argument("--idempotency-key", metavar="KEY", help="retrying with the same key never runs it twice")
    p.add_argument("--follow", action="store_true",
                   help="print the operation's events until it ends; exit 0 if it succeeded, else 1")
    p.set_defaults(run=submit)

    p = commands.add_parser(
        "tail", help="print a topic's events as they come",
        description="Print a topic's events, one JSON line each, reconnecting with the last cursor when the "
                    "connection drops. Topics need a subscribe token: a domain's read route that hands out "
                    "a topic's URLs (Gateway.topic_urls) gives one in its subscribe_url; pass it with --token, "
                    "or pass that subscribe_url itself as TOPIC.")
    p.add_argument("topic", metavar="TOPIC", help="a topic (orders/42), or a subscribe URL carrying its token")
    _add_url(p)
    p.add_argument("--token", help="the subscribe token for TOPIC")
    p.add_argument("--cursor", help="start after this cursor (default: from now on)")
    p.add_argument("--max-events", type=int, metavar="N", help="exit after N events")
    p.set_defaults(run=tail)
    return parser


def _add_targets(group: argparse._MutuallyExclusiveGroup) -> None:
    group.add_argument("--domain", action="append", metavar="MODULE:ATTR",
                       help="a herald.Domain (or a list of them) to serve; repeatable")
    group.add_argument("--app", metavar="MODULE:ATTR",
                       help="an ASGI app, or a factory of one (called; given settings= if it takes them)")
    group.add_argument("--config", metavar="FILE",
                       help="a proxy config file (herald.toml): commands forwarded to upstream HTTP services")


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default: {DEFAULT_URL})")


def main(argv: list[str] | None = None) -> int:
    """Run the ``herald`` command; its exit status."""
    args = build_parser().parse_args(argv)
    # targets are found from the current directory, as `python -m …` and uvicorn find them: an
    # installed `herald` script otherwise puts only its own directory on the path
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        status: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return status
