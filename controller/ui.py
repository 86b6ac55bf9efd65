"""The dashboard: static files shipped in the package, served at /ui (no CDN, no npm).

The page asks for a token (kept in sessionStorage) and calls the same API as the CLI;
monitoring through the controller's own ``/v1/monitoring`` (one origin, one login).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_ui(app: FastAPI, monitoring: bool) -> None:
    """Serve the dashboard; ``monitoring``: a collector is configured (charts, alarms)."""

    @app.get("/ui/config.json", include_in_schema=False)
    async def ui_config() -> JSONResponse:
        return JSONResponse({"monitoring": monitoring})

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC, html=True), name="ui")
