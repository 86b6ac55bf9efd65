"""HTTP calls for the CLI, with every failure turned into one readable line."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from cladnet.keys import ca_hash


class CliError(Exception):
    """Printed as ``cladnet: <message>``; exit code 1."""


def fetch_ca(url: str, expected_hash: str) -> str:
    """The controller's CA (PEM) from ``/v1/ca``, fetched without verification and
    accepted only if its public-key hash is ``expected_hash`` (trust on first use,
    as ``kubeadm join --discovery-token-ca-cert-hash``)."""
    try:
        # Not verified here: the hash check below is the verification.
        r = httpx.get(f"{url.rstrip('/')}/v1/ca", verify=False, timeout=15.0)
        pem = str(r.json()["ca_pem"]) if r.status_code == 200 else None
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach controller at {url}: {exc}") from None
    except (ValueError, KeyError, TypeError):
        pem = None
    if pem is None:
        raise CliError(f"controller at {url} published no CA (/v1/ca): is it serving TLS?")
    actual = ca_hash(pem)
    if actual != expected_hash.strip().lower():
        raise CliError(
            f"controller CA hash {actual} does not match --ca-hash {expected_hash}: "
            "refusing to trust it"
        )
    return pem


class Api:
    def __init__(
        self,
        base: str | None,
        token: str | None,
        what: str = "controller",
        ca_pem: str | None = None,
    ) -> None:
        if not base:
            raise CliError(
                f"no {what} URL: run 'cladnet login URL --token-file F' or set "
                f"CLADNET_{what.upper()}"
            )
        self.base, self.what = base.rstrip("/"), what
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # A pinned CA is the only one trusted for this server, not one more.
        verify: ssl.SSLContext | bool = True
        if ca_pem:
            verify = ssl.create_default_context(cadata=ca_pem)
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=15.0, verify=verify)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise CliError(
                    f"{self.what} at {self.base}: its TLS certificate is not trusted "
                    f"({exc}); pin its CA: cladnet login {self.base} --ca-hash sha256:…"
                ) from None
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
