"""The async transport (the agent's): controller replicas with failover, the host's
credential, and the calls the agent makes, over :mod:`cladnet.api_client.endpoints`.

Transport failures are raised as httpx errors (the agent's retry loop and standing tell
"no answer" from "an answer"); error answers as :class:`ApiClientError`.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar, cast

import httpx

from cladnet.api_client import endpoints as ep
from cladnet.api_client.errors import ApiClientError, WatchGone, error_for, pinned

B = TypeVar("B")
R = TypeVar("R")

PEER_PAGE = 1000  # peers per list request: bounded reads on the controller


def _urls(url: str) -> list[str]:
    return [u.strip().rstrip("/") for u in url.split(",") if u.strip()]


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """httpx's default verification (its CA bundle), made once per process: httpx
    loads the bundle for every new client (≈ 90 ms of CPU), and a client is made at
    join, at start and on every reconnect or failover."""
    return httpx.create_ssl_context()


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise error_for(response.status_code, body, response.text, response.headers.get("retry-after"))


async def fetch_pinned_ca(url: str, expected_hash: str) -> str:
    """The controller's CA (PEM), fetched unverified once and accepted only if its
    public-key hash is ``expected_hash`` (given with the join token).

    ``url`` may list replicas (comma-separated): they share the cluster CA, so the
    first that answers will do."""
    urls = _urls(url)
    async with httpx.AsyncClient(verify=False, timeout=10.0) as http:  # checked below
        for i, replica in enumerate(urls):
            try:
                response = await http.get(f"{replica}{ep.CA.path}")
                break
            except httpx.TransportError:
                if i == len(urls) - 1:
                    raise
        _raise_for(response)
        pem = str(response.json()["ca_pem"])
    return pinned(pem, expected_hash)


class AsyncClient:
    """The controller replicas (comma-separated URLs) and, after joining, this host's
    credential. A connection failure moves to the next replica; one-shot calls try
    each replica once before giving up. ``verify``: True, a pinned CA file, or a context."""

    def __init__(
        self,
        url: str,
        credential: str | None = None,
        timeout: float = 10.0,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self.urls = _urls(url)
        if not self.urls:
            raise ValueError("no controller URL given")
        self._current = 0
        self.credential = credential
        if isinstance(verify, str):  # a pinned CA file
            verify = ssl.create_default_context(cafile=verify)
        elif verify is True:
            # Plain http:// replicas verify nothing, so load no CA bundle for them.
            https = any(u.startswith("https:") for u in self.urls)
            verify = _default_tls() if https else False
        self._timeout, self._verify = timeout, verify
        self._http = self._new_http()

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.urls[self._current]

    def _new_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=self._timeout, verify=self._verify)

    async def _fail_over(self) -> None:
        """Switch to the next replica (no-op with a single URL beyond a fresh pool)."""
        self._current = (self._current + 1) % len(self.urls)
        await self.reconnect()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def reconnect(self) -> None:
        """Drop pooled connections: after a local address change they are bound to a
        source address that no longer exists and would only time out."""
        old, self._http = self._http, self._new_http()
        await old.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"} if self.credential else {}

    async def call(
        self,
        endpoint: ep.Endpoint[B, R],
        body: B | None = None,
        query: Mapping[str, Any] | None = None,
        **path: str,
    ) -> R:
        """One call to ``endpoint`` (path parameters as keywords); its answer, or
        :class:`ApiClientError` for an error answer."""
        for attempt in range(len(self.urls)):
            try:
                response = await self._http.request(
                    endpoint.method,
                    endpoint.path_for(**path),
                    json=body,
                    params=query,
                    headers=self._headers(),
                )
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError):
                if attempt == len(self.urls) - 1:
                    raise
                await self._fail_over()
        _raise_for(response)
        return cast(R, response.json() if response.content else None)

    async def join(self, token: str, **fields: Any) -> ep.Joined:
        """Join a network with a join token; stores the returned credential."""
        result = await self.call(ep.JOIN, cast(ep.JoinBody, {"token": token, **fields}))
        self.credential = result["credential"]
        return result

    async def rejoin(self, token: str, private_key: str, **fields: Any) -> ep.Joined | None:
        """Re-join as the host registered with ``private_key``'s public key, proving it
        holds the key by answering an X25519 challenge (the key itself is never sent).
        None when no host of the token's network has that key."""
        from cladnet.keys import answer_challenge, public_key_of

        public_key = public_key_of(private_key)
        ask: ep.ChallengeBody = {"token": token, "public_key": public_key}
        try:
            challenge = await self.call(ep.JOIN_CHALLENGE, ask)
        except ApiClientError as exc:
            if exc.code == "host_not_found":
                return None
            raise
        proof = answer_challenge(
            private_key,
            challenge["ephemeral_public_key"],
            challenge["nonce"],
            challenge["host_id"],
            challenge["network_id"],
        )
        return await self.join(
            token, public_key=public_key, host_id=challenge["host_id"], proof=proof, **fields
        )

    async def heartbeat(self, host_id: str, **fields: Any) -> ep.HeartbeatReply:
        """I am alive, at these addresses."""
        return await self.call(ep.HEARTBEAT, cast(ep.HeartbeatBody, fields), host_id=host_id)

    async def metrics_credentials(self, host_id: str) -> ep.MetricsCredentials:
        """Where and as whom to publish metrics (a fresh broker password each call)."""
        return await self.call(ep.METRICS_CREDENTIALS, host_id=host_id)

    async def pending_commands(self, host_id: str) -> list[ep.QueuedCommand]:
        """Commands this host is to run (asking tells the controller it accepts them)."""
        result = await self.call(ep.HOST_COMMANDS, host_id=host_id)
        return list(result["commands"])

    async def report_command(self, host_id: str, command_id: str, report: dict[str, Any]) -> None:
        """A command's state: ``running`` when it starts, then how it ended."""
        await self.call(ep.COMMAND_REPORT, report, host_id=host_id, command_id=command_id)

    async def leave(self, host_id: str) -> None:
        """Remove this host from its network."""
        await self.call(ep.HOST_LEAVE, host_id=host_id)

    async def network(self, network_id: str) -> ep.Network:
        """The network this host is a member of."""
        return await self.call(ep.NETWORK, ref=network_id)

    async def list_peers(self, network_id: str, page: int = PEER_PAGE) -> tuple[list[ep.Peer], int]:
        """The network's peers and the revision to watch from."""
        peers, revision, _ = await self.list_peers_and_policy(network_id, page)
        return peers, revision

    async def list_peers_and_policy(
        self, network_id: str, page: int = PEER_PAGE
    ) -> tuple[list[ep.Peer], int, ep.Json | None]:
        """The network's peers, the revision to watch from and the policy (None from a
        controller without policies), in pages of ``page`` (all read at one revision; the
        policy comes with the last; a controller without paging sends all at once)."""
        for _ in range(3):  # a snapshot compacted between pages: list from the start
            peers: list[ep.Peer] = []
            params: dict[str, Any] = {"limit": page}
            try:
                while True:
                    result = await self.call(ep.NETWORK_PEERS, query=params, ref=network_id)
                    peers += result["peers"]
                    following = cast(dict[str, Any], result).get("continue")
                    if not following:
                        return peers, result["revision"], result.get("policy")
                    params["continue"] = following
            except WatchGone:
                if "continue" not in params:
                    raise
        raise ApiClientError(410, "continue_expired", "the peer list kept changing under us")

    async def watch_peers(self, network_id: str, since: int) -> AsyncIterator[ep.Json]:
        """Peer events after ``since``; raises WatchGone (list again) or httpx errors (resume)."""
        params = {"watch": "true", "since": str(since)}
        # The controller sends keep-alive lines (every 15 s by default): a read that
        # waits 45 s means the path is dead and the watch must be resumed.
        timeout = httpx.Timeout(10.0, read=45.0)
        try:
            async with self._http.stream(
                ep.NETWORK_PEERS.method,
                ep.NETWORK_PEERS.path_for(ref=network_id),
                params=params,
                headers=self._headers(),
                timeout=timeout,
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError:
            # The caller resumes from the last revision; do that on the next replica.
            if len(self.urls) > 1:
                await self._fail_over()
            raise
