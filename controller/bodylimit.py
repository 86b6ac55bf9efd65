"""Request body limits, as plain ASGI: a declared length over the limit is refused before
anything is read, and a body without one (chunked) is counted as it arrives."""

from __future__ import annotations

import json
from typing import Any

from controller.telemetry import API_ERRORS


class BodyTooLarge(Exception):
    """Raised into the application when the body it is reading passes the limit."""


class BodyLimit:
    """At most ``max_bytes`` of body per request; ``per_path`` holds tighter limits for
    exact paths (the unauthenticated join). Over the limit: 413 ``body_too_large``."""

    def __init__(self, app: Any, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        # The server (h11) has already refused a Content-Length that is not a number.
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large(send, limit)
        received, exceeded, started = 0, False, False

        async def counting() -> Any:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def sending(message: Any) -> None:
            nonlocal started
            if exceeded and not started:  # whatever the app makes of a cut body: ours wins
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, sending)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await too_large(send, limit)


async def too_large(send: Any, limit: int) -> None:
    """The 413 answer, in the API's error shape."""
    API_ERRORS.labels("body_too_large").inc()
    body = json.dumps(
        {"error": "body_too_large", "message": f"the request body is over {limit} bytes"}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
