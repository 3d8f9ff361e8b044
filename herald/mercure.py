"""The Mercure protocol as the reference hub (dunglas/mercure 0.x, draft-dunglas-mercure-07) speaks it. No I/O.

What crosses the wire, and how Herald stores it:

* **Publish.** A ``POST`` form (``topic`` repeated: the first is canonical, the rest alternates;
  ``data``, ``private``, ``id``, ``type``, ``retry``) becomes an :class:`Update`
  (:func:`parse_publish_form`). An update is stored as one CloudEvent on :data:`FIREHOSE`, the one
  internal topic of every Mercure update: its ``id`` is the update's id, its ``type`` is
  :data:`EVENT_TYPE`, its ``subject`` the canonical topic, and its ``data`` the update's fields
  (:meth:`Update.to_event`). The firehose's name holds a ``*``, which no Herald topic may, so
  Herald's own streams, sockets and publish API can never reach it: private updates stay private.
* **Select.** A topic selector is ``*``, a URI Template (:mod:`herald.uritemplate`) or any other
  string, matched as section "Topic Selectors" of the draft says (:class:`Selector`): ``*`` matches
  everything, a string matches itself, a template matches its expansions.
* **Authorise.** A JWT's ``mercure.publish`` and ``mercure.subscribe`` claims are lists of
  selectors (:class:`Claims`). A publisher may publish an update when each of its topics matches
  one of its publish selectors; a subscriber receives a private update when one of the update's
  topics (canonical or alternate) matches one of its subscribe selectors.
* **Render.** An update is written to subscribers as the reference hub writes it: ``event:`` when
  it has a type, ``retry:`` when it has one, ``id:``, then one ``data:`` line per line of its data
  (CR, LF and CRLF all break lines; empty lines are kept), then a blank line (:meth:`Update.render`).

Errors are :class:`MercureError` with the HTTP status the hub answers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import orjson

from herald.events import Event, now_iso
from herald.protocol import Frame
from herald.uritemplate import Template, compile_template

HUB_PATH = "/.well-known/mercure"
"""Where the hub is, on every Mercure hub (the draft's "well-known" fixed path)."""
FIREHOSE = "mercure/*"
"""The internal topic that holds every Mercure update, in publish order (not a valid Herald topic name)."""
EVENT_TYPE = "mercure.update"
"""The CloudEvents ``type`` of a stored Mercure update."""
EARLIEST = "earliest"
"""The reserved ``Last-Event-ID``: from the oldest update the hub still has; also what it answers when it has none."""
COOKIE = "mercureAuthorization"
"""The cookie a browser's ``EventSource`` carries its subscriber JWT in (the draft's recommended name)."""
FORM_TYPE = "application/x-www-form-urlencoded"
ALL = "*"

# Limits
MAX_STRING = 2048
"""Characters in one topic, selector, id or type (the draft sets none; a subscriber chooses its selectors)."""

SUBSCRIBE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"private, no-cache, no-store, must-revalidate, max-age=0"),
    (b"pragma", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]
"""The headers of a subscription's response, as the reference hub sends them (no proxy may buffer or cache it)."""
PREAMBLE = b":\n"
"""The comment a stream opens with, so the headers and the connection are confirmed at once."""
HEARTBEAT = b":\n"
"""An SSE comment, written when a stream has been idle for ``HERALD_HEARTBEAT`` seconds."""

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MercureError(Exception):
    """A request the hub refuses: ``status`` is the HTTP status, ``detail`` says why, ``kind`` names the problem."""

    def __init__(self, status: int, detail: str, kind: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind


def check_string(value: str, what: str) -> str:
    """``value`` if it is 1-2048 characters with no control character (C0, DEL or C1); :class:`MercureError` else.

    A line break in an ``id`` or ``type`` would end its SSE field and start another; in a topic or a
    selector it has no meaning either (the current draft forbids control characters in both).
    """
    if not value or len(value) > MAX_STRING:
        raise MercureError(400, f"{what} must be 1-{MAX_STRING} characters", "bad-" + what)
    if _CONTROL.search(value):
        raise MercureError(400, f"{what} must not contain control characters", "bad-" + what)
    return value


# Topic selectors ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Selector:
    """One topic selector: ``*``, a URI Template, or a plain string that matches only itself."""

    source: str
    template: Template | None = field(compare=False)  # made from the source: two selectors are equal by it

    @property
    def everything(self) -> bool:
        """Whether this is ``*``."""
        return self.source == ALL

    def matches(self, topic: str) -> bool:
        """Whether ``topic`` is selected: ``*``, the same string, or an expansion of the template."""
        if self.source == ALL or self.source == topic:
            return True
        return self.template is not None and self.template.matches(topic)

    def matches_any(self, topics: Iterable[str]) -> bool:
        """Whether any of ``topics`` is selected."""
        return any(self.matches(topic) for topic in topics)


@lru_cache(maxsize=4096)
def selector(source: str) -> Selector:
    """The :class:`Selector` of ``source`` (compiled once and shared: many subscribers use the same ones)."""
    # only a string with a "{" can be a template that matches anything but itself (the reference hub's shortcut)
    return Selector(source, compile_template(source) if "{" in source and source != ALL else None)


def selectors(sources: Iterable[str]) -> tuple[Selector, ...]:
    """The selectors of ``sources``, validated (:func:`check_string`), without repeats, in their order."""
    return tuple(selector(check_string(s, "topic")) for s in dict.fromkeys(sources))


def any_matches(chosen: Iterable[Selector], topics: Iterable[str]) -> bool:
    """Whether one of ``chosen`` selects one of ``topics``."""
    topics = tuple(topics)
    return any(s.matches_any(topics) for s in chosen)


# Updates -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Update:
    """One Mercure update: its topics (the canonical first), data, id and SSE options."""

    topics: tuple[str, ...]
    data: str
    id: str
    private: bool = False
    type: str | None = None
    retry: int | None = None

    def render(self) -> bytes:
        """The update as an SSE message, byte for byte as the reference hub writes it."""
        head = b""
        if self.type is not None:
            head += b"event: " + self.type.encode() + b"\n"
        if self.retry is not None:
            head += b"retry: %d\n" % self.retry
        data = _LINE_BREAK.sub("\ndata: ", self.data)
        return head + b"id: " + self.id.encode() + b"\ndata: " + data.encode() + b"\n\n"

    def to_event(self) -> Event:
        """The CloudEvent that stores this update on :data:`FIREHOSE`."""
        fields: dict[str, Any] = {"topics": list(self.topics), "data": self.data}
        if self.private:
            fields["private"] = True
        if self.type is not None:
            fields["type"] = self.type
        if self.retry is not None:
            fields["retry"] = self.retry
        return Event(id=self.id, source=HUB_PATH, type=EVENT_TYPE, time=now_iso(), subject=self.topics[0],
                     data=fields)

    @classmethod
    def from_event(cls, event_id: str, fields: Any) -> Update:
        """The update an event's id and ``data`` store; :class:`ValueError` when they are not one."""
        if not isinstance(fields, dict):
            raise ValueError("a Mercure update's event holds an object")
        topics, data = fields.get("topics"), fields.get("data")
        kind, retry = fields.get("type"), fields.get("retry")
        if (not isinstance(topics, list) or not topics or not all(isinstance(t, str) for t in topics)
                or not isinstance(data, str) or not isinstance(kind, str | None)
                or not (retry is None or (isinstance(retry, int) and not isinstance(retry, bool)))):
            raise ValueError("not a Mercure update")
        return cls(tuple(topics), data, event_id, fields.get("private") is True, kind, retry)


def parse_publish_form(body: bytes, *, max_topics: int, new_id: Callable[[], str] | None = None) -> Update:
    """The update a publish request's form body describes; :class:`MercureError` (400) when it is not one.

    As the reference hub reads it: every ``topic`` field, the first of each other field, unknown
    fields ignored; ``private`` set with any value (the draft recommends ``on``); ``data`` optional
    (an update may only say that its topic changed); an empty ``id``, ``type`` or ``retry`` is unset,
    and so is ``retry=0``. Without an ``id`` the hub makes one, ``urn:uuid:`` and a random UUID.
    """
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, errors="strict", max_num_fields=max_topics + 64)
    except UnicodeDecodeError as exc:
        raise MercureError(400, "the form must be UTF-8", "bad-form") from exc
    except ValueError as exc:  # more fields than max_num_fields
        raise MercureError(400, f"too many fields (at most {max_topics} topics)", "bad-form") from exc
    topics = [value for name, value in pairs if name == "topic"]
    first: dict[str, str] = {}
    for name, value in pairs:
        first.setdefault(name, value)
    if not topics:
        raise MercureError(400, 'missing "topic": name the updated topic', "missing-topic")
    if len(topics) > max_topics:
        raise MercureError(400, f"at most {max_topics} topics per update", "too-many-topics")
    for topic in topics:
        check_string(topic, "topic")
    update_id = first.get("id") or None
    if update_id is not None:
        check_string(update_id, "id")
        if update_id.startswith("#") or update_id == EARLIEST:
            raise MercureError(400, f"an id must not start with '#' nor be {EARLIEST!r}", "bad-id")
    kind = first.get("type") or None
    if kind is not None:
        check_string(kind, "type")
    retry: int | None = None
    raw_retry = first.get("retry") or None
    if raw_retry is not None:
        if not (raw_retry.isascii() and raw_retry.isdigit() and len(raw_retry) <= 19):
            raise MercureError(400, '"retry" must be a number of milliseconds', "bad-retry")
        retry = int(raw_retry) or None
    return Update(
        topics=tuple(topics),
        data=first.get("data", ""),
        id=update_id or (new_id or new_update_id)(),
        private="private" in first,
        type=kind,
        retry=retry,
    )


def new_update_id() -> str:
    """A fresh update id: ``urn:uuid:`` and a random (version 4) UUID, as the reference hub makes them."""
    return f"urn:uuid:{uuid.uuid4()}"


class MercureFrame(Frame):
    """A frame of :data:`FIREHOSE` with its update decoded and rendered once, shared by every subscriber."""

    __slots__ = ("message", "update")

    def __init__(self, cursor: str, encoded: bytes, update: Update) -> None:
        super().__init__(FIREHOSE, cursor, EVENT_TYPE, encoded)
        self.update = update
        self.message = update.render()

    @classmethod
    def of(cls, frame: Frame) -> MercureFrame:
        """The Mercure frame of a live frame of the firehose; :class:`ValueError` when it holds no update."""
        try:
            doc = orjson.loads(frame.encoded)
        except orjson.JSONDecodeError as exc:
            raise ValueError("not JSON") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise ValueError("not a CloudEvent")
        return cls(frame.cursor, frame.encoded, Update.from_event(doc["id"], doc.get("data")))

    @classmethod
    def stored(cls, cursor: str, event: Event) -> MercureFrame:
        """The Mercure frame of an event read from the firehose's history; :class:`ValueError` if not an update."""
        return cls(cursor, event.encoded, Update.from_event(event.id, event.data))


# Authorisation -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Claims:
    """What a Mercure JWT allows: its ``mercure.publish`` and ``mercure.subscribe`` selectors (``None``: absent)."""

    publish: tuple[Selector, ...] | None = None
    subscribe: tuple[Selector, ...] | None = None
    expires_at: int = 0
    """The token's ``exp`` (Unix seconds), when a subscription must end; 0: it has none."""

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> Claims:
        """The claims of a verified JWT's payload; :class:`MercureError` (401) when ``mercure`` is malformed."""
        mercure = payload.get("mercure")
        if mercure is None:
            mercure = {}
        if not isinstance(mercure, dict):
            raise MercureError(401, 'the token\'s "mercure" claim must be an object', "invalid-token")
        exp = payload.get("exp")
        return cls(_claim(mercure, "publish"), _claim(mercure, "subscribe"),
                   int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else 0)

    def may_publish(self, topics: Iterable[str]) -> bool:
        """Whether every topic matches one of the publish selectors (never, without the claim)."""
        chosen = self.publish
        return chosen is not None and all(any(s.matches(t) for s in chosen) for t in topics)

    def may_receive(self, update: Update) -> bool:
        """Whether a subscriber holding these claims may receive ``update`` (a public one: always)."""
        return not update.private or (self.subscribe is not None and any_matches(self.subscribe, update.topics))


ANONYMOUS = Claims()
"""The claims of a subscriber without a token: public updates only."""


def _claim(mercure: dict[str, Any], name: str) -> tuple[Selector, ...] | None:
    value = mercure.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise MercureError(401, f'the token\'s "mercure.{name}" claim must be a list of topic selectors',
                           "invalid-token")
    try:
        return selectors(value)
    except MercureError as exc:
        raise MercureError(401, f'"mercure.{name}": {exc.detail}', "invalid-token") from exc
