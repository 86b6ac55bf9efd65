"""``cladnet-controller``: serve the API with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from cladnet import logs
from controller.api import create_app, serving_tls
from controller.config import parse_args


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logs.setup(settings.log_level)
    app = create_app(settings)
    files = serving_tls(settings)  # already made by create_app; loaded, not regenerated
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our JSON log lines
        access_log=False,
        timeout_graceful_shutdown=2,
        ssl_certfile=str(files.cert) if files else None,
        ssl_keyfile=str(files.key) if files else None,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
