"""The dashboard: static files shipped in the package, served at /ui (no CDN, no npm).

The page asks for a token (kept in sessionStorage) and calls the same API as the CLI.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_ui(app: FastAPI, collector_url: str | None) -> None:
    @app.get("/ui/config.json", include_in_schema=False)
    async def ui_config() -> JSONResponse:
        return JSONResponse({"collector_url": collector_url})

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC, html=True), name="ui")
