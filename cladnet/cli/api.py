"""The CLI's side of :mod:`cladnet.api_client`: its own error, a connection from a
context, and every failure as one readable line."""

from __future__ import annotations

from cladnet.api_client import ApiClientError, SyncClient, TrustError


class CliError(Exception):
    """Printed as ``cladnet: <message>``; exit code 1."""


def connect(
    base: str | None, token: str | None, what: str = "controller", ca_pem: str | None = None
) -> SyncClient:
    """A client of ``what`` at ``base`` (a CliError that says how to set it when unset)."""
    if not base:
        raise CliError(
            f"no {what} URL: run 'cladnet login URL --token-file F' or set CLADNET_{what.upper()}"
        )
    return SyncClient(base, token, what, ca_pem=ca_pem)


def one_line(exc: ApiClientError | TrustError | CliError) -> str:
    """What ``cladnet`` prints for a failure (after ``cladnet: ``)."""
    if isinstance(exc, ApiClientError) and exc.status == 401:
        return "unauthorized (check your token: cladnet login)"
    if isinstance(exc, ApiClientError) and exc.status:
        text = f"{exc.code}: {exc.message}"
    else:
        text = str(exc)
    return " ".join(text.split())  # one line, whatever the server sent
