"""An upstream HTTP service for the command proxy's tests, run as a uvicorn process of its own.

``python -m uvicorn tests.herald.proxy.upstream:app --port N`` (see :class:`tests.herald.proxy.support.Upstream`).
Every request it gets is recorded with its arrival time, path, headers and body; ``GET /_log``
hands the record back, so a test checks what Herald sent, how often and when. The endpoints are
the outcomes of the proxy's table:

* ``POST /fast`` — ``201`` with JSON at once, ``Location: /things/<ce-id>``;
* ``POST /slow`` — ``202`` with ``Herald-Cancel``, then after ``SLOW_SECONDS`` one event and the
  result through the callback API (``/slow?fail=1``: a failed result);
* ``POST /failing`` — ``500`` on the first two attempts of a request (by ``ce-id``), then ``200``;
* ``POST /busy`` — ``429`` with ``Retry-After: 1`` on the first attempt, then ``200``;
* ``POST /refusing`` — ``422`` with an ``application/problem+json`` body; ``/refusing?plain=1``: text;
* ``POST /hanging`` — answers nothing for ``HANG_SECONDS`` (past any test's timeout);
* ``POST /sticky`` — hangs on the first attempt of a request, answers ``200`` on the next ones
  (a worker killed mid-call, and the redelivery);
* ``POST /waiting`` — ``202`` with ``Herald-Cancel`` (not with ``?quiet=1``), and never reports by itself;
* ``DELETE /jobs/{id}`` — ``200``: the job is canceled (recorded);
* ``GET /things/{id}`` — a JSON document, for proxied read routes (``?status=404`` answers that).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SLOW_SECONDS = 1.0
HANG_SECONDS = 60.0
LOG: list[dict[str, Any]] = []
ATTEMPTS: Counter[str] = Counter()
TASKS: set[asyncio.Task[None]] = set()


async def _record(request: Request) -> tuple[dict[str, Any], int]:
    """Record the request; its entry and how many times this ``ce-id`` came to this path, this time included."""
    body = await request.body()
    entry = {"t": time.time(), "method": request.method, "path": request.url.path, "query": request.url.query,
             "headers": dict(request.headers), "body": body.decode(errors="replace")}
    LOG.append(entry)
    key = f"{request.url.path} {request.headers.get('ce-id')}"
    ATTEMPTS[key] += 1
    return entry, ATTEMPTS[key]


async def fast(request: Request) -> Response:
    entry, _ = await _record(request)
    data = orjson.loads(entry["body"] or b"null")
    return JSONResponse({"done": True, "echo": data}, status_code=201,
                        headers={"Location": f"/things/{request.headers.get('ce-id')}"})


async def slow(request: Request) -> Response:
    await _record(request)
    task = asyncio.create_task(_report_later(dict(request.headers), failed="fail" in request.query_params))
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
    return Response(status_code=202, headers={"Herald-Cancel": f"/jobs/{request.headers.get('ce-id')}"})


async def _report_later(headers: dict[str, str], *, failed: bool) -> None:
    await asyncio.sleep(SLOW_SECONDS)
    callback = headers["herald-callback"]
    auth = {"Authorization": f"Bearer {headers['herald-callback-token']}"}
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        event = {"id": f"progress-{headers['ce-id']}", "type": "ThingProgressed", "source": "/upstream",
                 "data": {"percent": 50}}
        LOG.append({"t": time.time(), "method": "CALLBACK", "path": "events",
                    "status": (await client.post(f"{callback}/events", json=event, headers=auth)).status_code})
        result = ({"status": "failed", "error": {"title": "Could not make it", "status": 422}} if failed
                  else {"status": "succeeded", "result": {"made": headers["ce-id"]},
                        "location": f"/things/{headers['ce-id']}"})
        LOG.append({"t": time.time(), "method": "CALLBACK", "path": "result",
                    "status": (await client.post(f"{callback}/result", json=result, headers=auth)).status_code})


async def failing(request: Request) -> Response:
    _, attempt = await _record(request)
    if attempt <= 2:
        return Response(b"temporarily broken", status_code=500)
    return JSONResponse({"attempt": attempt})


async def busy(request: Request) -> Response:
    _, attempt = await _record(request)
    if attempt == 1:
        return Response(status_code=429, headers={"Retry-After": "1"})
    return JSONResponse({"attempt": attempt})


async def refusing(request: Request) -> Response:
    await _record(request)
    if "plain" in request.query_params:
        return Response(b"no such album", status_code=404, media_type="text/plain")
    problem = {"type": "https://upstream.example/problems/bad-size", "title": "Size not supported",
               "status": 422, "detail": "sizes are 64, 128 or 256", "sizes": [64, 128, 256]}
    return Response(orjson.dumps(problem), status_code=422, media_type="application/problem+json")


async def hanging(request: Request) -> Response:
    await _record(request)
    await asyncio.sleep(HANG_SECONDS)
    return JSONResponse({"late": True})


async def sticky(request: Request) -> Response:
    _, attempt = await _record(request)
    if attempt == 1:
        await asyncio.sleep(HANG_SECONDS)
    return JSONResponse({"attempt": attempt})


async def waiting(request: Request) -> Response:
    await _record(request)
    if "quiet" in request.query_params:
        return Response(status_code=202)
    return Response(status_code=202, headers={"Herald-Cancel": f"/jobs/{request.headers.get('ce-id')}"})


async def cancel_job(request: Request) -> Response:
    await _record(request)
    return JSONResponse({"canceled": request.path_params["job"]})


async def thing(request: Request) -> Response:
    await _record(request)
    status = int(request.query_params.get("status", "200"))
    return JSONResponse({"thing": request.path_params["thing"], "query": request.url.query}, status_code=status,
                        headers={"ETag": '"v1"', "X-Internal": "not passed on"})


async def log(request: Request) -> Response:
    return Response(orjson.dumps(LOG), media_type="application/json")


app = Starlette(routes=[
    Route("/fast", fast, methods=["POST"]),
    Route("/slow", slow, methods=["POST"]),
    Route("/failing", failing, methods=["POST"]),
    Route("/busy", busy, methods=["POST"]),
    Route("/refusing", refusing, methods=["POST"]),
    Route("/hanging", hanging, methods=["POST"]),
    Route("/sticky", sticky, methods=["POST"]),
    Route("/waiting", waiting, methods=["POST"]),
    Route("/jobs/{job}", cancel_job, methods=["DELETE"]),
    Route("/things/{thing}", thing, methods=["GET"]),
    Route("/_log", log, methods=["GET"]),
])
