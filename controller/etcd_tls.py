"""aetcd over TLS (and mutual TLS): a client whose ``connect`` opens a secure gRPC channel.

aetcd 1.0.0 has no TLS: ``Client.connect`` always calls ``rpc.insecure_channel``.
``TlsClient.connect`` is that method with one line changed (the channel); everything
else is aetcd's. It relies on aetcd's internals as of 1.0.0 (``_handle_errors``, the
stub attributes, ``watcher.Watcher``), which is why pyproject pins ``aetcd==1.0.0``
and tests/test_tls.py fails when the upstream ``connect`` changes
(``UPSTREAM_CONNECT_SHA256``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.client import _handle_errors

# sha256 of inspect.getsource(aetcd.Client.connect) in aetcd 1.0.0, the code copied below.
UPSTREAM_CONNECT_SHA256 = "739bd1375223094e19daf098d371f493cb667fb98c13e656b1e111a654af9264"


@dataclass(frozen=True)
class EtcdTls:
    """PEM files: the CA that signed etcd's certificate (None: the system's CAs), and
    for mutual TLS a client certificate and key."""

    ca: Path | None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials; read the files now, so a bad path fails at start."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


class TlsClient(aetcd.Client):
    """``aetcd.Client`` that connects with the given channel credentials."""

    _is_connecting: bool  # set by aetcd.Client.__init__

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    @_handle_errors
    async def connect(self) -> None:
        """aetcd 1.0.0's ``Client.connect`` with ``secure_channel`` for ``insecure_channel``."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self._credentials, options=list(self._options.items())
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False
