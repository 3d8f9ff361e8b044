"""``herald.toml``: proxied commands, proxied read routes and topic rules, declared in a file (docs/proxy.md).

``herald serve --config herald.toml`` and ``herald worker --config herald.toml`` read it with
:func:`load_config`, which returns the :class:`~herald.Domain` it declares; ``herald check --config``
reads it and stops there. The whole file is checked before anything is served, and the first
mistake is a :class:`ConfigError` naming the file, the line of the entry and the key::

    herald.toml:14: command[2].upstream: upstream must be an absolute http:// or https:// URL, got 'ftp://x'

Entries are counted from 1 in the order of the file. ``tomllib`` gives the line and column of a
syntax error; for every other error the line is the one of the entry's ``[[command]]`` header.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from herald.domain import COMMAND_METHODS, SUBSCRIBE_RULES, Domain, DomainError, check_event_type
from herald.proxy.spec import Backoff, ProxyCommand, ProxyRoute, ProxySpecError, check_names, path_params
from herald.schema import SchemaError, compile_schema

COMMAND_KEYS = ("method", "path", "event", "upstream", "timeout", "attempts", "backoff", "schema", "schema_file",
                "cancel", "concurrency", "topics", "subject", "summary")
ROUTE_KEYS = ("path", "upstream", "timeout", "public")
TOPIC_KEYS = ("pattern", "subscribe", "summary")
BACKOFF_KEYS = ("initial", "max", "factor")
TOP_KEYS = ("name", "title", "description", "command", "route", "topic")


class ConfigError(ValueError):
    """A config file Herald cannot serve; the message names the file, the entry's line and the key."""


def load_config(path: str | Path) -> Domain:
    """The domain ``path`` declares; :class:`ConfigError` if the file cannot be read or is wrong."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    return parse_config(text, source=str(path), base=file.resolve().parent, name=file.stem)


def parse_config(text: str, *, source: str = "herald.toml", base: Path | None = None, name: str = "proxy") -> Domain:
    """The domain a config file's ``text`` declares (``base``: where ``schema_file`` paths start)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return _Reader(text, source, base or Path.cwd()).domain(doc, name)


class _Reader:
    """Reads one parsed file into a domain, naming ``table[n].key`` and the entry's line in each error."""

    def __init__(self, text: str, source: str, base: Path) -> None:
        self.source = source
        self.base = base
        self.lines = {table: _header_lines(text, table) for table in ("command", "route", "topic")}

    def error(self, where: str, message: str, line: int | None = None) -> ConfigError:
        """A :class:`ConfigError` for ``where`` (``command[2].upstream``), at ``line`` when known."""
        at = f"{self.source}:{line}" if line is not None else self.source
        return ConfigError(f"{at}: {where}: {message}")

    def domain(self, doc: dict[str, Any], default_name: str) -> Domain:
        _unknown_keys(doc, TOP_KEYS, lambda message: self.error("(top level)", message))
        name = doc.get("name", default_name)
        title = doc.get("title", "")
        description = doc.get("description", "")
        for key, value in (("name", name), ("title", title), ("description", description)):
            if not isinstance(value, str):
                raise self.error(key, f"must be a string, got {_kind(value)}")
        domain = Domain(name, title=title, description=description)
        for table, read in (("command", self.command), ("route", self.route), ("topic", self.topic)):
            entries = doc.get(table, [])
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise self.error(table, f"declare each one as a [[{table}]] table")
            lines = self.lines[table]
            for index, entry in enumerate(entries, 1):
                line = lines[index - 1] if len(lines) == len(entries) else None
                read(domain, entry, _Entry(self, f"{table}[{index}]", line, entry))
        if not domain.commands and not domain.routes:
            raise self.error("command", "the file declares no [[command]] and no [[route]]: nothing to serve")
        return domain

    def command(self, domain: Domain, entry: dict[str, Any], at: _Entry) -> None:
        at.only(COMMAND_KEYS)
        method = at.string("method", default="POST").upper()
        path = at.string("path")
        event = at.string("event")
        upstream = at.string("upstream")
        try:
            check_event_type(event)
        except DomainError as exc:
            raise at.error("event", str(exc)) from None
        _, params = at.spec(lambda: path_params(path))
        subject = at.optional_string("subject")
        if subject is not None:
            at.spec(lambda: check_names(subject, params, "subject"))
        if method not in COMMAND_METHODS:
            raise at.error("method", f"one of {', '.join(COMMAND_METHODS)}, got {method!r}")
        schema = self.schema(at)
        spec = at.spec(lambda: ProxyCommand(
            method, path, event, upstream, timeout=at.number("timeout", default=10.0),
            attempts=at.integer("attempts", default=5), backoff=self.backoff(at) or Backoff(),
            cancel=at.optional_string("cancel"), concurrency=at.integer("concurrency", default=None),
            topics=tuple(at.strings("topics"))))
        try:
            domain.proxy(spec.method, spec.path, event=spec.event, upstream=spec.upstream, timeout=spec.timeout,
                         attempts=spec.attempts, backoff=spec.backoff, schema=schema, subject=subject,
                         summary=at.optional_string("summary") or "", cancel=spec.cancel,
                         concurrency=spec.concurrency, topics=spec.topics)
        except DomainError as exc:  # what is left: the command or its event declared by an earlier entry
            raise at.error("event" if "handlers" in str(exc) else "path", str(exc)) from None

    def schema(self, at: _Entry) -> dict[str, Any] | None:
        inline = at.entry.get("schema")
        file = at.optional_string("schema_file")
        if inline is not None and file is not None:
            raise at.error("schema", "give schema or schema_file, not both")
        key = "schema" if file is None else "schema_file"
        if file is not None:
            path = self.base / file
            try:
                inline = orjson.loads(path.read_bytes())
            except OSError as exc:
                raise at.error(key, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
            except orjson.JSONDecodeError as exc:
                raise at.error(key, f"{str(path)!r} is not JSON: {exc}") from None
        if inline is None:
            return None
        if not isinstance(inline, dict):
            raise at.error(key, f"a JSON Schema is an object (an inline table), got {_kind(inline)}")
        try:
            compile_schema(inline)
        except SchemaError as exc:
            raise at.error(key, str(exc)) from None
        return inline

    def backoff(self, at: _Entry) -> Backoff | None:
        raw = at.entry.get("backoff")
        if raw is None:
            return None
        if _is_number(raw):
            return at.spec(lambda: Backoff(initial=float(raw)))
        if not isinstance(raw, dict):
            raise at.error("backoff", f"a number of seconds, or {{ initial = …, max = …, factor = … }}; "
                                      f"got {_kind(raw)}")
        _unknown_keys(raw, BACKOFF_KEYS, lambda message: at.error("backoff", message))
        for key, value in raw.items():
            if not _is_number(value):
                raise at.error(f"backoff.{key}", f"must be a number, got {_kind(value)}")
        return at.spec(lambda: Backoff(**{k: float(v) for k, v in raw.items()}))

    def route(self, domain: Domain, entry: dict[str, Any], at: _Entry) -> None:
        at.only(ROUTE_KEYS)
        path = at.string("path")
        if any(getattr(r, "path", None) == path for r in domain.routes):
            raise at.error("path", f"{path!r} is declared by an earlier [[route]]")
        upstream = at.string("upstream")
        timeout = at.number("timeout", default=10.0)
        public = at.boolean("public", default=False)
        at.spec(lambda: ProxyRoute(path, upstream, timeout=timeout, public=public))
        domain.proxy_route(path, upstream, timeout=timeout, public=public)

    def topic(self, domain: Domain, entry: dict[str, Any], at: _Entry) -> None:
        at.only(TOPIC_KEYS)
        pattern = at.string("pattern")
        subscribe = at.string("subscribe", default="token")
        if subscribe not in SUBSCRIBE_RULES:
            raise at.error("subscribe", f"one of {', '.join(SUBSCRIBE_RULES)}, got {subscribe!r}")
        try:
            domain.topic(pattern, subscribe=subscribe, summary=at.optional_string("summary") or "")  # type: ignore[arg-type]
        except (DomainError, re.error) as exc:
            raise at.error("pattern", str(exc)) from None


class _Entry:
    """One ``[[table]]`` entry being read: typed getters whose errors name ``table[n].key``."""

    def __init__(self, reader: _Reader, where: str, line: int | None, entry: dict[str, Any]) -> None:
        self.reader = reader
        self.where = where
        self.line = line
        self.entry = entry

    def error(self, key: str, message: str) -> ConfigError:
        return self.reader.error(f"{self.where}.{key}", message, self.line)

    def only(self, keys: tuple[str, ...]) -> None:
        _unknown_keys(self.entry, keys, lambda message: self.reader.error(self.where, message, self.line))

    def spec(self, build: Callable[[], Any]) -> Any:
        """``build()``, its :class:`ProxySpecError` named after the key it concerns."""
        try:
            return build()
        except ProxySpecError as exc:
            raise self.error(exc.key or "?", str(exc)) from None

    def string(self, key: str, *, default: str | None = None) -> str:
        value = self.entry.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {_kind(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if key in self.entry else None

    def strings(self, key: str) -> list[str]:
        value = self.entry.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of strings, got {_kind(value)}")
        return value

    def number(self, key: str, *, default: float) -> float:
        value = self.entry.get(key, default)
        if not _is_number(value) or not value > 0:
            raise self.error(key, f"must be a number of seconds > 0, got {_kind(value)}")
        return float(value)

    def integer(self, key: str, *, default: int | None) -> Any:
        value = self.entry.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.error(key, f"must be an integer >= 1, got {_kind(value)}")
        return value

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self.entry.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_kind(value)}")
        return value


def _unknown_keys(table: dict[str, Any], known: tuple[str, ...], error: Callable[[str], ConfigError]) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
            raise error(f"unknown key {key!r}{hint}")


def _header_lines(text: str, table: str) -> list[int]:
    """The line numbers (from 1) of the ``[[table]]`` headers of ``text``, in order."""
    header = re.compile(r"\s*\[\[\s*" + re.escape(table) + r"\s*\]\]\s*(#.*)?")
    return [n for n, line in enumerate(text.splitlines(), 1) if header.fullmatch(line)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return repr(value[:80])
    if isinstance(value, bool):
        return "true" if value else "false"
    if _is_number(value):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    return "an array" if isinstance(value, list) else type(value).__name__
