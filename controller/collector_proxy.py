"""The collector's read-only queries under the controller's own origin: ``/v1/monitoring/…``.

The dashboard is served by the controller; a browser that reaches the controller may
not reach the collector (it often listens on loopback), and calling it from the page
would need CORS and a second token. So the controller authenticates the caller (an
admin or viewer token), then asks the collector with its own collector token
(``CLADNET_COLLECTOR_TOKEN``) — the browser never sees the collector or its token.
Only the GET queries listed in ``ALLOWED`` pass: no alarm rule changes through here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from controller.errors import ApiError
from controller.openapi import READERS, contract

log = logging.getLogger("cladnet.controller.collector_proxy")

# The collector's read-only query paths (under its /v1/), one path segment per name.
ALLOWED = re.compile(
    r"^(metrics/latest|metrics/names|series|ingest|alarms"
    r"|hosts/[^/]+/(latest|ingest)|networks/[^/]+/(summary|latency|pairs))$"
)
TIMEOUT = 10.0


def router(
    collector_url: str | None, collector_token: str | None, reader: Callable[..., Any]
) -> APIRouter:
    """``GET /v1/monitoring/{path}`` → the collector's ``GET /v1/{path}``, for readers."""
    routes = APIRouter()

    @routes.get(
        "/v1/monitoring/{path:path}",
        dependencies=[Depends(reader)],
        **contract(
            READERS,
            {
                404: ["not_found"],
                502: ["collector_unreachable", "collector_refused", "collector_error"],
                503: ["no_collector", "no_collector_token"],
            },
        ),
    )
    async def monitoring(path: str, request: Request) -> JSONResponse:
        """A collector query (metrics, series, alarms firing) as the collector answers it."""
        segments = path.split("/")
        if not ALLOWED.match(path) or any(s in ("", ".", "..") for s in segments):
            raise ApiError(404, "not_found", f"no monitoring query {path!r}")
        if not collector_url:
            raise ApiError(503, "no_collector", "this controller has no --collector-url")
        if not collector_token:
            raise ApiError(
                503, "no_collector_token", "set CLADNET_COLLECTOR_TOKEN on the controller"
            )
        # Each segment re-encoded: a host named "a%2F..%2F" stays one segment.
        url = f"{collector_url.rstrip('/')}/v1/" + "/".join(quote(s, safe="") for s in segments)
        headers = {"Authorization": f"Bearer {collector_token}"}
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                r = await client.get(url, params=request.query_params, headers=headers)
        except httpx.HTTPError as e:
            log.warning("collector unreachable", extra={"error": repr(e)})
            raise ApiError(502, "collector_unreachable", f"cannot reach the collector: {e}") from e
        if r.status_code in (401, 403):
            # Not the caller's fault: the controller's token for the collector is wrong.
            raise ApiError(502, "collector_refused", "the collector refused the controller's token")
        try:
            body = r.json()
        except ValueError as e:
            raise ApiError(502, "collector_error", f"collector answered {r.status_code}") from e
        return JSONResponse(body, status_code=r.status_code)

    return routes
