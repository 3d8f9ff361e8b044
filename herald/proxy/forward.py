"""The worker's side of the command proxy: a handler per proxied command that forwards its request event.

:class:`ProxyHandler` is what ``Domain.proxy`` registers for the command's event type. A worker
binds it as it starts (:class:`herald.worker.Bindable`): the bound :class:`Forwarder` shares the
run's :class:`~herald.proxy.pool.UpstreamPool` with the other proxied commands, signs callback
tokens with ``HERALD_SECRET`` and builds callback URLs from ``HERALD_CALLBACK_URL`` (else
``HERALD_PUBLIC_URL``). Each delivery of the request is one attempt: the event goes to the
upstream in the CloudEvents binary mode (:mod:`herald.proxy.binding`), and the answer's outcome
(:mod:`herald.proxy.outcome`) ends the operation, hands it off to the callback API, or asks for
another delivery after a backoff (:class:`~herald.worker.Retry`). Every attempt publishes
``herald.operation.progress`` with ``{"attempt", "attempts", "reason"}`` (and ``retry_in`` when
another follows). What a reason says is generic; the upstream's host and the exception stay in the log.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx
import orjson

from herald.auth import TokenSigner
from herald.proxy.binding import binary_headers
from herald.proxy.outcome import PROBLEM_BASE, Accepted, Outcome, Refused, Retriable, Succeeded, classify
from herald.proxy.pool import AnswerTooLarge, UpstreamPool
from herald.proxy.spec import ProxyCommand, ProxySpecError, origin
from herald.settings import Settings, SettingsError
from herald.worker import Context, Retry, WorkerRun

log = logging.getLogger("herald.proxy")

PROGRESS = "herald.operation.progress"
POOL = "herald.proxy.pool"
"""Where a worker run keeps the pool its proxied commands share (:attr:`herald.worker.WorkerRun.shared`)."""
RESOURCE_PREFIX = "herald-proxy/"
"""A proxied operation's broker resource (``herald-proxy/<id>``): ``{"cancel": URL}`` once it has one."""


def callback_base(settings: Settings) -> str:
    """The gateway's absolute URL as upstreams reach it; :class:`SettingsError` when none is configured."""
    base = settings.callback_url or settings.public_url
    if not base.startswith(("http://", "https://")):
        raise SettingsError("the command proxy needs HERALD_CALLBACK_URL (or HERALD_PUBLIC_URL): the gateway's "
                            "absolute http(s) URL as upstreams reach it, sent to them as Herald-Callback"
                            + (f"; got {base!r}" if base else ""))
    return base.rstrip("/")


def shared_pool(run: WorkerRun) -> UpstreamPool:
    """The run's upstream pool, made (and closed with the run) by the first proxied command bound."""
    pool = run.shared.get(POOL)
    if pool is None:
        pool = UpstreamPool(default_limit=run.settings.proxy_concurrency,
                            max_response=run.settings.proxy_max_response)
        run.shared[POOL] = pool
        run.stack.push_async_callback(pool.aclose)
    assert isinstance(pool, UpstreamPool)
    return pool


class ProxyHandler:
    """The handler of one proxied command, as declared; bound to a worker run it is a :class:`Forwarder`."""

    def __init__(self, spec: ProxyCommand) -> None:
        self.spec = spec

    def __repr__(self) -> str:
        return f"ProxyHandler({self.spec.event} → {self.spec.upstream})"

    async def __call__(self, ctx: Context) -> None:
        """Not bound: a worker binds it first (:meth:`bind`)."""
        raise RuntimeError("a ProxyHandler runs bound to a worker run: Worker binds it as it starts")

    def bind(self, run: WorkerRun) -> Forwarder:
        """The forwarder for this run; :class:`SettingsError` when the settings give no callback URL."""
        base = callback_base(run.settings)
        pool = shared_pool(run)
        pool.want(self.spec.origin, self.spec.concurrency)
        return Forwarder(self.spec, pool, TokenSigner(run.settings.secret), callback_base=base,
                         token_ttl=run.settings.operation_ttl)


@dataclass(slots=True)
class Forwarder:
    """Forwards one proxied command's request events to its upstream, one attempt per delivery."""

    spec: ProxyCommand
    pool: UpstreamPool
    signer: TokenSigner
    callback_base: str
    token_ttl: int

    @property
    def max_attempts(self) -> int:
        """Deliveries of a request before its operation fails (the worker's check, for crashed attempts too)."""
        return self.spec.attempts

    async def __call__(self, ctx: Context) -> None:
        """One attempt: forward the request event and act on the upstream's answer."""
        spec = self.spec
        attempt = max(1, ctx.operation.attempts)
        op_id = ctx.operation_id
        params = spec.params(ctx.event.source)
        try:
            url = spec.upstream_url(params, op_id)
            topics = spec.topic_names(params, op_id)
            cancel = spec.cancel_url(params, op_id)
        except ProxySpecError:
            log.exception("cannot forward %s", ctx.event.type, extra={"correlation_id": op_id})
            await ctx.fail_problem({"type": PROBLEM_BASE + "proxy-error", "title": "The command could not be forwarded",
                                    "status": 500, "detail": "the gateway's proxy configuration does not fit this "
                                    "request; the worker logged why with this operation's id"})
            return
        if cancel is not None:
            await ctx.put_resource_if_absent(RESOURCE_PREFIX + op_id, {"cancel": cancel}, ttl=self.token_ttl)
        headers = binary_headers(ctx.event)
        headers["herald-callback"] = f"{self.callback_base}/operations/{op_id}"
        headers["herald-callback-token"] = self.signer.issue_callback(op_id, topics=topics, ttl=self.token_ttl)
        headers["herald-attempt"] = str(attempt)
        body = orjson.dumps(ctx.event.data)
        outcome, reason = await self._send(url, headers, body, op_id)
        await self._conclude(ctx, outcome, reason, attempt, url)

    async def _send(self, url: str, headers: dict[str, str], body: bytes, op_id: str) -> tuple[Outcome, str]:
        spec = self.spec
        try:
            answer = await self.pool.send("POST", url, origin=spec.origin, headers=headers, content=body,
                                          timeout=spec.timeout)
        except (TimeoutError, httpx.TimeoutException):
            reason = f"no answer from the upstream within {spec.timeout:g} s"
            return Retriable(reason), reason
        except httpx.ConnectError as exc:
            log.warning("could not connect to %s: %s", spec.origin, exc, extra={"correlation_id": op_id})
            reason = "could not connect to the upstream"
            return Retriable(reason), reason
        except httpx.TransportError as exc:
            log.warning("the connection to %s broke: %r", spec.origin, exc, extra={"correlation_id": op_id})
            reason = "the connection to the upstream broke"
            return Retriable(reason), reason
        except AnswerTooLarge as exc:
            reason = f"the upstream's answer is too long ({exc})"
            return Refused({"type": PROBLEM_BASE + "bad-upstream-answer", "status": 502, "detail": reason,
                            "title": "The upstream's answer broke the proxy contract"}), reason
        return classify(answer.status, answer.headers, answer.body), f"the upstream answered {answer.status}"

    async def _conclude(self, ctx: Context, outcome: Outcome, reason: str, attempt: int, url: str) -> None:
        progress: dict[str, Any] = {"attempt": attempt, "attempts": self.spec.attempts, "reason": reason}
        if isinstance(outcome, Succeeded):
            ctx.stage(PROGRESS, progress)
            await ctx.succeed(outcome.result, location=outcome.location)
        elif isinstance(outcome, Accepted):
            ctx.stage(PROGRESS, {**progress, "reason": reason + "; it reports through the callback API"})
            cancel = self._cancel_url(url, outcome.cancel, ctx.operation_id)
            if cancel is not None:
                await ctx.put_resource(RESOURCE_PREFIX + ctx.operation_id, {"cancel": cancel}, ttl=self.token_ttl)
            await ctx.hand_off()
        elif isinstance(outcome, Refused):
            ctx.stage(PROGRESS, progress)
            await ctx.fail_problem(outcome.problem)
        elif attempt >= self.spec.attempts:
            ctx.stage(PROGRESS, progress)
            await ctx.fail_problem({
                "type": PROBLEM_BASE + "attempts-exhausted", "title": "Gave up after repeated attempts",
                "status": 502, "detail": f"{attempt} attempts to reach the upstream failed; the last: {reason}",
                "attempts": attempt,
            })
        else:
            delay = self.spec.backoff.delay(attempt, retry_after=outcome.retry_after, jitter=random.random)
            await ctx.emit(PROGRESS, {**progress, "retry_in": round(delay, 3)})
            raise Retry(delay)

    def _cancel_url(self, url: str, given: str | None, op_id: str) -> str | None:
        """The cancel URL of a ``Herald-Cancel`` header, resolved against the upstream URL, if on its origin."""
        if given is None:
            return None
        resolved = urljoin(url, given.strip())
        if not resolved.startswith(("http://", "https://")) or origin(resolved) != self.spec.origin:
            log.warning("ignored Herald-Cancel %r: not on the upstream's origin %s", given[:200], self.spec.origin,
                        extra={"correlation_id": op_id})
            return None
        return resolved
