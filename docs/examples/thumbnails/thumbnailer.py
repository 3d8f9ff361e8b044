"""An image thumbnail service that takes 2 s per thumbnail, fronted by Herald (docs/proxy.md).

It knows nothing of Herald but its HTTP contract: it answers ``202`` at once, then reports progress
and the result to the ``Herald-Callback`` URL with the ``Herald-Callback-Token``. Run it with
``uvicorn thumbnailer:app --port 9000`` (from this directory).
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECONDS = 2.0
thumbnails: dict[str, dict[str, object]] = {}
jobs: dict[str, asyncio.Task[None]] = {}


async def make(request: Request) -> Response:
    """``POST /thumbnails``: the request event in binary mode (``ce-*`` headers, the data as the body)."""
    event_id = request.headers["ce-id"]
    job = request.headers["ce-correlationid"]  # the operation's id: one thumbnail per operation
    if event_id not in jobs:  # a redelivered request carries the same ce-id: start it once
        body = await request.json()
        jobs[event_id] = asyncio.create_task(work(job, body, request.headers["herald-callback"],
                                                  request.headers["herald-callback-token"]))
    return Response(status_code=202, headers={"Herald-Cancel": f"/jobs/{event_id}"})


async def work(job: str, body: dict[str, object], callback: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=10) as client:
        for percent in (25, 50, 75):
            await asyncio.sleep(SECONDS / 4)
            event = {"id": f"{job}-{percent}", "type": "ThumbnailProgressed", "source": "/thumbnailer",
                     "data": {"percent": percent}}
            await client.post(f"{callback}/events", json=event, headers=auth)
        await asyncio.sleep(SECONDS / 4)
        size = body.get("size", 128)
        thumbnails[job] = {"id": job, "source": body["url"], "size": size,
                           "thumbnail": f"{body['url']}?thumbnail={size}x{size}"}
        await client.post(f"{callback}/result", headers=auth, json={
            "status": "succeeded", "result": thumbnails[job], "location": f"/thumbnails/{job}"})


async def read(request: Request) -> Response:
    """``GET /thumbnails/{id}``, which Herald's ``[[route]]`` passes on."""
    found = thumbnails.get(request.path_params["id"])
    return JSONResponse(found) if found else JSONResponse({"title": "no such thumbnail"}, status_code=404)


async def cancel(request: Request) -> Response:
    """``DELETE /jobs/{id}``: where the ``Herald-Cancel`` header pointed."""
    task = jobs.get(request.path_params["id"])
    if task is None or task.done():
        return Response(status_code=404)
    task.cancel()
    return Response(status_code=204)


app = Starlette(routes=[
    Route("/thumbnails", make, methods=["POST"]),
    Route("/thumbnails/{id}", read, methods=["GET"]),
    Route("/jobs/{id}", cancel, methods=["DELETE"]),
])
