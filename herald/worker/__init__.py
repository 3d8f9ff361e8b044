"""The worker SDK: handlers per request event type, each given a :class:`Context`.

A worker takes request events from the broker (competing consumers), moves the
operation to ``running``, and calls the handler registered for the event's type. The
handler answers with correlated response events and finishes the operation::

    async def confirm(ctx: Context) -> None:
        order = {"id": ctx.operation_id, **ctx.data}
        ctx.stage("OrderConfirmed", order, topics=[f"orders/{order['id']}"])
        await ctx.succeed(order, location=f"/orders/{order['id']}")

    @orders.handler("OrderPlaced")      # on a Domain; or a settings class's ``handlers`` mapping

:meth:`Context.stage` queues an event to go out with the operation's end: the events, the
terminal status change and the acknowledgement of the request are one atomic broker step (one
round trip on Redis), so a watcher sees the events and the end together, and a redelivery after
a crash cannot find the operation ended without its events. :meth:`Context.emit` publishes at
once (progress, or anything a watcher should see before the end). Staged events go out with
whatever ends the operation: ``succeed``, ``fail``, ``canceled``, the default success of a
handler that returns, or the failure of one that raises; :class:`Retry` discards them.

Control flow, as in arq: raise :class:`Retry` to have the request handed out again later;
any other exception fails the operation with a problem (the worker carries on); a
handler that returns without finishing succeeds with its return value as the result.
A request whose operation asked to be cancelled ends as ``canceled`` without running (the
flag is checked as of the atomic move to ``running``, so a handler need not check it first),
and a handler can ask :meth:`Context.cancel_requested` at its own checkpoints.

A handler whose work goes on elsewhere (the command proxy's upstream that answered ``202``) calls
:meth:`Context.hand_off`: the request is acknowledged and the operation stays ``running`` until
something else ends it. A handler that needs this process's settings or resources held for the
worker's run (an HTTP connection pool) is :class:`Bindable`: the worker binds it as it starts and
runs what that returns; a bound handler with a ``max_attempts`` attribute has its own limit of
deliveries instead of the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from herald.broker.base import Broker, BrokerError, Delivery, OperationNotFound
from herald.events import Event, build_event
from herald.logs import bind_correlation_id
from herald.operations import IllegalTransition, Operation, Status, operation_topic, problem
from herald.settings import Settings

log = logging.getLogger("herald.worker")

PROBLEM_BASE = "https://herald.dev/problems/"
HANDLER_ERROR_DETAIL = "the handler raised an unexpected error; the worker logged it with this operation's id"


class Retry(Exception):
    """Raise in a handler to give the request back; it is handed out again after ``defer`` seconds."""

    def __init__(self, defer: float = 0.0) -> None:
        super().__init__(f"retry in {defer}s")
        self.defer = defer


class Failed(Exception):
    """Raise in a handler to fail the operation with this problem."""

    def __init__(self, title: str, detail: str | None = None, *, status: int = 422, type: str = "about:blank") -> None:
        super().__init__(detail or title)
        self.problem = problem(type, title, status, detail)


class Context:
    """What a handler gets: the request event and the means to answer it."""

    def __init__(
        self,
        broker: Broker,
        event: Event,
        operation: Operation,
        *,
        source: str,
        delivery: Delivery | None = None,
        on_settle: Callable[[Delivery], None] | None = None,
    ) -> None:
        self.broker = broker
        self.event = event
        self.operation = operation
        self.source = source
        self.delivery = delivery
        """The delivery of the request, acknowledged together with the operation's end."""
        self._on_settle = on_settle
        """Told :attr:`delivery` just before the broker is asked to acknowledge it (the worker lets its lease go)."""
        self.finished = False
        self.acked = False
        """Whether the broker acknowledged :attr:`delivery` (with the operation's end, or when refusing it)."""
        self._staged: list[tuple[str, Event]] = []

    @property
    def operation_id(self) -> str:
        """The correlation id of every event this handler emits."""
        return self.operation.id

    @property
    def data(self) -> Any:
        """The request event's payload."""
        return self.event.data

    async def emit(
        self, type: str, data: Any = None, *, topics: Iterable[str] = (), subject: str | None = None
    ) -> Event:
        """Publish a response event on the operation's topic and on each of ``topics``, now."""
        event, items = self._build(type, data, topics, subject)
        await self.broker.publish_many(items)  # one round trip for the operation's topic and every other one
        return event

    def stage(self, type: str, data: Any = None, *, topics: Iterable[str] = (), subject: str | None = None) -> Event:
        """Like :meth:`emit`, but the event goes out with the operation's end, in the same atomic step.

        Staged events come before the terminal status event on the operation's topic. :class:`Retry`
        discards them; after the operation has ended there is nothing left to stage them with.
        """
        if self.finished:
            raise RuntimeError("the operation has ended: use emit() to publish more events")
        event, items = self._build(type, data, topics, subject)
        self._staged += items
        return event

    def _build(
        self, type: str, data: Any, topics: Iterable[str], subject: str | None
    ) -> tuple[Event, list[tuple[str, Event]]]:
        event = build_event(
            type,
            data,
            source=self.source,
            subject=subject,
            correlationid=self.operation.id,
            causationid=self.event.id,
            traceparent=self.event.traceparent,
        )
        return event, [(operation_topic(self.operation.id), event), *((t, event) for t in topics)]

    # Resources: documents a handler stores for the domain's read routes (e.g. the 303 target)
    async def get_resource(self, path: str) -> dict[str, Any] | None:
        """The document stored under ``path``, or ``None``."""
        return await self.broker.get_resource(path)

    async def put_resource(self, path: str, document: dict[str, Any], *, ttl: int) -> None:
        """Store ``document`` under ``path`` for ``ttl`` seconds (read routes read it with ``Gateway.resource``)."""
        await self.broker.put_resource(path, document, ttl=ttl)

    async def put_resource_if_absent(self, path: str, document: dict[str, Any], *, ttl: int) -> dict[str, Any]:
        """Store ``document`` unless ``path`` holds one already; the document now stored (a redelivery keeps it)."""
        return await self.broker.put_resource_if_absent(path, document, ttl=ttl)

    async def update_resource(
        self, path: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], *, ttl: int
    ) -> dict[str, Any] | None:
        """Replace the document with ``change(document)`` atomically (see ``Broker.update_resource``)."""
        return await self.broker.update_resource(path, change, ttl=ttl)

    async def progress(self, data: Any) -> Event:
        """Publish a ``herald.operation.progress`` event on the operation's topic."""
        return await self.emit("herald.operation.progress", data)

    async def succeed(self, result: Any = None, *, location: str | None = None) -> Operation:
        """End the operation as ``succeeded``; ``location`` is the created resource, for the 303."""
        return await self._finish(Status.SUCCEEDED, result=result, location=location)

    async def fail(
        self, title: str, detail: str | None = None, *, status: int = 422, type: str = "about:blank"
    ) -> Operation:
        """End the operation as ``failed`` with an RFC 9457 problem."""
        return await self._finish(Status.FAILED, error=problem(type, title, status, detail))

    async def fail_problem(self, document: dict[str, Any]) -> Operation:
        """End the operation as ``failed`` with ``document``, a whole problem as it is (an upstream's own)."""
        return await self._finish(Status.FAILED, error=document)

    async def hand_off(self) -> None:
        """Acknowledge the request and leave the operation ``running``: something else will end it.

        For work that goes on outside this worker, such as an upstream that answered ``202`` and reports
        through the callback API. Staged events are published first; a crash before this call gets the
        request redelivered, as for any handler.
        """
        if self.finished:
            raise RuntimeError("the operation has ended already")
        if self._staged:
            await self.broker.publish_many(self._staged)
            self._staged = []
        if self.delivery is not None:
            if self._on_settle is not None:
                self._on_settle(self.delivery)
            await self.broker.ack(self.delivery)
        self.acked = self.acked or self.delivery is not None
        self.finished = True

    async def cancel_requested(self) -> bool:
        """Whether the client asked to cancel (reads the stored operation)."""
        current = await self.broker.get_operation(self.operation.id)
        return current is None or current.cancel_requested

    async def canceled(self) -> Operation:
        """End the operation as ``canceled`` (call after :meth:`cancel_requested` said so)."""
        return await self._finish(Status.CANCELED)

    async def _finish(self, status: Status, **fields: Any) -> Operation:
        # the staged events, the end and the ack in one step; the broker acks a refused move too
        if self.delivery is not None and self._on_settle is not None:
            self._on_settle(self.delivery)
        try:
            self.operation = await self.broker.transition(
                self.operation.id, status, traceparent=self.event.traceparent, current=self.operation,
                events=self._staged, ack=self.delivery, **fields,
            )
        except (IllegalTransition, OperationNotFound):
            self._settled()
            raise
        self._settled()
        self.finished = True
        return self.operation

    def _settled(self) -> None:
        self._staged = []
        self.acked = self.acked or self.delivery is not None

    def _discard_staged(self) -> None:
        self._staged = []


Handler = Callable[[Context], Awaitable[Any]]


@dataclass(slots=True)
class WorkerRun:
    """What one run of a :class:`Worker` lends the :class:`Bindable` handlers it binds."""

    settings: Settings
    stack: contextlib.AsyncExitStack
    """Closed when the run ends: a bound handler pushes what it must release (``stack.push_async_callback``)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """One per run, for what several handlers share (the command proxy's connection pool per upstream)."""


@runtime_checkable
class Bindable(Protocol):
    """A handler that is bound to a worker's run before it handles anything (see the module docstring)."""

    def bind(self, run: WorkerRun) -> Handler:
        """The handler to run for this worker run; may raise ``SettingsError`` if the settings cannot serve it."""
        ...


class Worker:
    """Runs handlers for request events taken from a broker."""

    def __init__(
        self,
        broker: Broker,
        handlers: Mapping[str, Handler],
        *,
        name: str | None = None,
        # Limits
        concurrency: int = 8,
        max_attempts: int = 5,
        # Timeouts
        poll: float = 1.0,
        shutdown_grace: float = 10.0,
        settings: Settings | None = None,
    ) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one handler")
        self.broker = broker
        self.handlers = dict(handlers)
        self.settings = settings
        """What :class:`Bindable` handlers are bound with (default: read from the environment when one needs it)."""
        self._bound: dict[str, Handler] = dict(handlers)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.poll = poll
        self.shutdown_grace = shutdown_grace
        self.source = f"herald.worker/{self.name}"
        self.handled = 0
        self._released = 0  # jobs given back by a handler (Retry): a burst looks once more after one
        self._stopping = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], Delivery] = {}
        self._leased: set[Delivery] = set()
        """The jobs whose lease is kept: taken, and not yet being acknowledged or given back by this worker."""

    def stop(self) -> None:
        """Stop taking new work; :meth:`run` returns once the current jobs finish or are released."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Consume until :meth:`stop` (or, with ``burst``, until no work is left)."""
        async with contextlib.AsyncExitStack() as stack:
            self._bind(stack)
            await self._run(burst)

    def _bind(self, stack: contextlib.AsyncExitStack) -> None:
        if not any(isinstance(h, Bindable) for h in self.handlers.values()):
            return
        run = WorkerRun(self.settings or Settings.from_env(), stack)
        self._bound = {t: h.bind(run) if isinstance(h, Bindable) else h for t, h in self.handlers.items()}

    async def _run(self, burst: bool) -> None:
        types = list(self.handlers)
        leases = asyncio.create_task(self._keep_leases(), name="worker-leases")
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                released = self._released
                try:
                    deliveries = await self.broker.consume(types, self.name, count=free, block=self.poll)
                except BrokerError as exc:
                    # one line per retry, not a traceback: an outage is expected, its cause is in the message
                    log.warning("broker unavailable (%s); retrying", exc)
                    await asyncio.sleep(min(self.poll, 1.0))
                    continue
                for delivery in deliveries:
                    if self._stopping.is_set():
                        # stopped while this consume waited: give the job straight back for another worker
                        await self._settle(self.broker.release, delivery)
                        continue
                    task = asyncio.create_task(self._handle(delivery))
                    self._inflight[task] = delivery
                    self._leased.add(delivery)
                    task.add_done_callback(self._forget)
                if burst and not deliveries:
                    if not self._inflight:
                        if self._released != released:
                            continue  # a job was given back while this consume looked (Redis): look again
                        return
                    await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        finally:
            try:
                await self._drain()  # leases are kept meanwhile: a job finishing within the grace stays ours
            finally:
                leases.cancel()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._leased.discard(self._inflight.pop(task))

    def _let_go(self, delivery: Delivery) -> None:
        """Stop extending ``delivery``: this worker is about to acknowledge it or give it back.

        Called before the broker is asked, not after it answered: the broker may apply the ack before an
        extend sent meanwhile, and report the job as no longer held while this worker still awaits the
        ack's reply (or its task has ended but is not yet out of ``_inflight``). If the ack fails, the
        request is redelivered after the visibility timeout, as the worker logs.
        """
        self._leased.discard(delivery)

    async def _keep_leases(self) -> None:
        """Extend the jobs in hand every third of the visibility timeout, so a long job is not handed out twice."""
        while True:
            await asyncio.sleep(max(0.05, self.broker.visibility_timeout / 3))
            held = list(self._leased)
            if not held:
                continue
            try:
                lost = await self.broker.extend(held, self.name)
            except BrokerError as exc:
                log.warning("could not extend the jobs in hand (%s); they may be handed out again", exc)
                continue
            for delivery in lost:
                if delivery in self._leased:  # one this worker settled meanwhile was let go first: not lost
                    self._leased.discard(delivery)  # warn once; another consumer holds it now
                    log.warning("job %s is no longer this worker's; another may run it too", delivery.delivery_id)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        pending = set(self._inflight)
        _, unfinished = await asyncio.wait(pending, timeout=self.shutdown_grace)
        for task in unfinished:
            delivery = self._inflight.get(task)
            task.cancel()
            if delivery is not None:
                self._let_go(delivery)
                try:
                    await self.broker.release(delivery)
                except BrokerError:
                    log.warning("could not release %s; it is redelivered after the visibility timeout",
                                delivery.delivery_id)
        if unfinished:
            await asyncio.wait(unfinished, timeout=1.0)

    async def _handle(self, delivery: Delivery) -> None:
        event = delivery.event
        bind_correlation_id(event.correlationid)  # this task's log lines are about this operation
        try:
            settle = await self._run_handler(delivery)
        except BrokerError:
            log.warning("broker error while handling %s; it will be redelivered", event.id, exc_info=True)
            return
        if settle == "ack":
            await self._settle(self.broker.ack, delivery)
        elif settle == "release":
            await self._settle(self.broker.release, delivery)
            self._released += 1
        # "acked": the broker acknowledged it in the step that ended the operation

    async def _settle(self, action: Callable[[Delivery], Awaitable[None]], delivery: Delivery) -> None:
        self._let_go(delivery)
        try:
            await action(delivery)
        except BrokerError:
            log.warning("could not settle %s; it will be redelivered", delivery.delivery_id, exc_info=True)

    async def _run_handler(self, delivery: Delivery) -> str:
        event = delivery.event
        op_id = event.correlationid or ""
        # a first delivery brings the operation as accepted: moved to running from that copy without a read (a
        # copy made stale by a cancel is read again by the move itself, and the cancel is honoured below)
        operation = delivery.operation if delivery.deliveries == 1 and delivery.operation is not None else None
        if operation is None:
            operation = await self.broker.get_operation(op_id) if op_id else None
        if operation is None or operation.status.terminal:
            return "ack"  # expired, or a repeat delivery of finished work
        if operation.cancel_requested:
            return await self._end_unrun(delivery, operation, Status.CANCELED)
        handler = self._bound[event.type]
        if operation.attempts >= (getattr(handler, "max_attempts", None) or self.max_attempts):
            return await self._end_unrun(
                delivery,
                operation,
                Status.FAILED,
                error=problem(
                    PROBLEM_BASE + "attempts-exhausted",
                    "Gave up after repeated attempts",
                    500,
                    f"the request was handed to a worker {operation.attempts} times without finishing",
                    attempts=operation.attempts,
                ),
            )
        try:
            operation = await self.broker.transition(op_id, Status.RUNNING, traceparent=event.traceparent,
                                                     current=operation)
        except (IllegalTransition, OperationNotFound):
            return "ack"
        if operation.cancel_requested:
            # the cancel came between our read and the move (the move re-read the changed operation):
            # still refuse to run, so a handler need not re-read the operation before it starts
            return await self._end_unrun(delivery, operation, Status.CANCELED)
        ctx = Context(self.broker, event, operation, source=self.source, delivery=delivery, on_settle=self._let_go)
        try:
            result = await handler(ctx)
            if not ctx.finished:
                await ctx.succeed(result)
        except Retry as retry:
            ctx._discard_staged()
            if ctx.acked:
                return "acked"  # the handler ended the operation before it asked for a retry
            if retry.defer > 0:
                await asyncio.sleep(retry.defer)
            return "release"
        except Failed as failure:
            await self._fail_quietly(ctx, failure.problem)
        except OperationNotFound:
            if not ctx.acked:
                raise  # not about this operation's end: a broker error as any other
            # the operation expired while the handler ran; the broker acknowledged the request
        except (BrokerError, asyncio.CancelledError):
            raise
        except IllegalTransition:
            pass  # someone else finished it (a repeat delivery raced us); nothing to change
        except Exception:
            log.exception("handler for %s failed", event.type, extra={"correlation_id": op_id})
            # what the exception says stays in the log: it may name hosts, queries or secrets, and the
            # operation is public to whoever holds its URL; a handler raises Failed to say something
            await self._fail_quietly(
                ctx,
                problem(PROBLEM_BASE + "handler-error", "The worker's handler failed", 500, HANDLER_ERROR_DETAIL),
            )
        self.handled += 1
        return "acked" if ctx.acked else "ack"

    async def _end_unrun(self, delivery: Delivery, operation: Operation, status: Status, **fields: Any) -> str:
        """End an operation whose handler is not run, acknowledging its request in the same step."""
        self._let_go(delivery)
        try:
            await self.broker.transition(operation.id, status, traceparent=delivery.event.traceparent,
                                         current=operation, ack=delivery, **fields)
        except (IllegalTransition, OperationNotFound):
            pass  # ended elsewhere, or expired: the broker acknowledged the request all the same
        return "acked"

    async def _fail_quietly(self, ctx: Context, doc: dict[str, Any]) -> None:
        try:
            await ctx._finish(Status.FAILED, error=doc)
        except (IllegalTransition, OperationNotFound):
            pass  # ended elsewhere, or expired; the broker acknowledged the request


class WorkerSettings:
    """Base for a worker settings class (as in arq): ``herald worker module:Settings``.

    Each option left ``None`` comes from the environment (:class:`~herald.settings.Settings`).
    """

    handlers: Mapping[str, Handler] = {}
    concurrency: int | None = None
    max_attempts: int | None = None
    shutdown_grace: float | None = None
    """Seconds current jobs get to finish after SIGTERM before they are given back."""


def worker_options(settings: Settings, spec: type[WorkerSettings] | None = None, **overrides: Any) -> dict[str, Any]:
    """The worker's limits and grace: ``overrides``, else the settings class ``spec``, else ``settings``.

    The one place that decides them, for the embedded worker and ``herald worker`` alike.
    """
    options: dict[str, Any] = {
        "concurrency": settings.worker_concurrency,
        "max_attempts": settings.max_attempts,
        "shutdown_grace": settings.worker_grace,
    }
    if spec is not None:
        for name in options:
            value = getattr(spec, name, None)
            if value is not None:
                options[name] = value
    options.update({k: v for k, v in overrides.items() if v is not None})
    return options
