"""The sync transport (the CLI's): one server (the controller or the collector) over
:mod:`cladnet.api_client.endpoints`, every failure an :class:`ApiClientError` whose
message reads as one line."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import httpx

from cladnet.api_client import endpoints as ep
from cladnet.api_client.errors import ApiClientError, error_for, pinned

B = TypeVar("B")
R = TypeVar("R")

TIMEOUT = 15.0


def fetch_ca(url: str, expected_hash: str) -> str:
    """The controller's CA (PEM) from ``/v1/ca``, fetched without verification and
    accepted only if its public-key hash is ``expected_hash`` (trust on first use,
    as ``kubeadm join --discovery-token-ca-cert-hash``)."""

    try:
        # Not verified here: the hash check below is the verification.
        r = httpx.get(f"{url.rstrip('/')}{ep.CA.path}", verify=False, timeout=TIMEOUT)
        pem = str(r.json()["ca_pem"]) if r.status_code == 200 else None
    except httpx.HTTPError as exc:
        raise ApiClientError(0, "unreachable", f"cannot reach controller at {url}: {exc}") from None
    except (ValueError, KeyError, TypeError):
        pem = None
    if pem is None:
        raise ApiClientError(
            0, "no_ca", f"controller at {url} published no CA (/v1/ca): is it serving TLS?"
        )
    return pinned(pem, expected_hash)


class SyncClient:
    """``base`` with a bearer ``token``; with ``ca_pem`` that CA is the only one trusted
    for it (pinned, not one more). ``what`` names the server in messages."""

    def __init__(
        self,
        base: str,
        token: str | None = None,
        what: str = "controller",
        ca_pem: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.base, self.what = base.rstrip("/"), what
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = True
        if ca_pem:
            verify = ssl.create_default_context(cadata=ca_pem)
        self.http = httpx.Client(
            base_url=self.base, headers=headers, timeout=timeout, verify=verify
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def call(
        self,
        endpoint: ep.Endpoint[B, R],
        body: B | None = None,
        query: Mapping[str, Any] | None = None,
        **path: str,
    ) -> R:
        """One call to ``endpoint`` (path parameters as keywords; ``None`` query values
        left out); its answer, or :class:`ApiClientError`."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        try:
            r = self.http.request(
                endpoint.method, endpoint.path_for(**path), json=body, params=params
            )
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ApiClientError(
                    0,
                    "untrusted_certificate",
                    f"{self.what} at {self.base}: its TLS certificate is not trusted "
                    f"({exc}); pin its CA: cladnet login {self.base} --ca-hash sha256:…",
                ) from None
            raise ApiClientError(
                0, "unreachable", f"cannot reach {self.what} at {self.base}: {exc}"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiClientError(0, "unreachable", f"{self.what} at {self.base}: {exc!r}") from None
        if r.status_code >= 400:
            try:
                parsed = r.json()
            except ValueError:
                parsed = None
            raise error_for(r.status_code, parsed, r.text, r.headers.get("retry-after"))
        return cast(R, r.json() if r.content else None)
