"""``cladnet-controller``: serve the API with uvicorn (HTTPS unless on loopback only)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from cladnet.roles import missing_extra

# An install without this role's extra: one line, not a traceback.
try:
    import uvicorn
    from aetcd import exceptions as etcd_errors

    from cladnet import logs
    from controller import tls
    from controller.api import create_app
    from controller.config import Settings, is_loopback, parse_args
    from controller.etcd import EtcdAuthError
    from controller.etcd import from_settings as etcd_from_settings
except ModuleNotFoundError as missing:
    missing_extra("cladnet-controller", "controller", missing)

log = logging.getLogger("cladnet.controller")


async def issue_serving_cert(settings: Settings) -> tls.TlsFiles | None:
    """This replica's certificate from the cluster CA (made by the first replica), or
    with ``--issue-cert`` one for another server of the cluster (e.g. the broker)."""
    if not settings.issue_cert and (not settings.tls or settings.tls_cert):
        return tls.serving_files(settings)
    etcd = etcd_from_settings(settings)
    try:
        await etcd.connect()
        if settings.issue_cert:
            ca = await tls.cluster_ca(etcd)
            return tls.issue(ca, list(settings.tls_names), settings.issue_cert)
        return await tls.prepare(settings, etcd)
    finally:
        await etcd.close()


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logs.setup(settings.log_level)
    try:
        # Before uvicorn: it loads the certificate when it starts, before our lifespan.
        files = asyncio.run(issue_serving_cert(settings))
    except (etcd_errors.ClientError, EtcdAuthError, OSError) as exc:
        log.error("cannot get the cluster CA from etcd", extra={"error": repr(exc)})
        sys.exit(1)
    if settings.issue_cert and files is not None:
        paths = {"cert": str(files.cert), "key": str(files.key), "ca": str(files.ca)}
        print(json.dumps({**paths, "ca_hash": files.ca_hash}))
        return
    app = create_app(settings)
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
    if not settings.tls and not is_loopback(settings.host):  # --insecure-http
        log.warning("serving plain HTTP", extra={"listen": settings.listen})
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
