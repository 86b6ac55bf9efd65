"""HTTP calls for the CLI, with every failure turned into one readable line."""

from __future__ import annotations

from typing import Any

import httpx


class CliError(Exception):
    """Printed as ``cladnet: <message>``; exit code 1."""


class Api:
    def __init__(self, base: str | None, token: str | None, what: str = "controller") -> None:
        if not base:
            raise CliError(
                f"no {what} URL: run 'cladnet login URL --token …' or set CLADNET_{what.upper()}"
            )
        self.base, self.what = base.rstrip("/"), what
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=15.0)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError as exc:
            raise CliError(f"cannot reach {self.what} at {self.base}: {exc}") from None
        except httpx.HTTPError as exc:
            raise CliError(f"{self.what} at {self.base}: {exc!r}") from None
        if r.status_code == 401:
            raise CliError("unauthorized (check your token: cladnet login)")
        if r.status_code >= 400:
            try:
                body = r.json()
                raise CliError(f"{body.get('error', r.status_code)}: {body.get('message', '')}")
            except ValueError:
                raise CliError(f"{self.what} answered {r.status_code}") from None
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})
