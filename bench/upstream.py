"""Scenario R's upstream: the smallest HTTP service a proxied command can be forwarded to.

``POST /jobs`` answers ``200`` with a JSON document at once (the request event's id and its data
echoed), so what scenario R measures is Herald's cost of forwarding, not the work. Served by
uvicorn with the flags the baselines get (:data:`bench.servers.UVICORN_FLAGS`).
"""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def job(request: Request) -> Response:
    """The work of one command: none."""
    data = orjson.loads(await request.body())
    return Response(orjson.dumps({"job": request.headers.get("ce-id"), "size": data.get("size")}),
                    media_type="application/json")


async def healthz(request: Request) -> Response:
    """Alive."""
    return Response(b"ok")


app = Starlette(routes=[Route("/jobs", job, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])])
