"""The agent's side of the controller API: join, heartbeat, status, leave, list + watch,
remote commands.

Plain JSON dicts, no pydantic: the agent stays small.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx

log = logging.getLogger("cladnet.agent")

T = TypeVar("T")

# Answers that say "not now" rather than "no": the controller restarts, its etcd
# is away, or it limits joins from this address.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
PEER_PAGE = 1000  # peers per list request: bounded reads on the controller
# What talking to the controller raises when the network or the controller is away.
NETWORK_ERRORS = (httpx.HTTPError, OSError)


class ControllerError(Exception):
    """The controller answered with an error (``code`` from its JSON body)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # the Retry-After header, in seconds, if any


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds from now; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class WatchGone(ControllerError):
    """The watch revision was compacted: list again."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        code, message = body.get("error", "http_error"), body.get("message", response.text)
    except ValueError:
        code, message = "http_error", response.text[:200]
    cls = WatchGone if response.status_code == 410 else ControllerError
    raise cls(response.status_code, code, message, retry_after(response.headers.get("retry-after")))


class GaveUp(Exception):
    """Transient failures went on for longer than the caller was willing to wait."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer at all (refused, reset, timed out) or a "not now"."""
    if isinstance(exc, ControllerError):
        return exc.status in TRANSIENT_STATUS
    if not isinstance(exc, httpx.TransportError | OSError):
        return False
    # A certificate that does not verify will not verify on the next try either.
    cause: BaseException | None = exc
    for _ in range(8):  # a bounded walk: exception chains may loop
        if cause is None:
            break
        if isinstance(cause, ssl.SSLError):
            return False
        cause = cause.__cause__ or cause.__context__
    return True


async def with_retries(
    call: Callable[[], Awaitable[T]],
    within: float,
    what: str,
    low: float = 1.0,
    high: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()`` until it succeeds, retrying transient failures for ``within`` seconds.

    Waits grow exponentially from ``low`` to ``high`` with ±20 % jitter (a fleet that
    boots together must not retry in lockstep); a ``Retry-After`` from the controller
    is waited at least. Anything else is raised at once; once time is up, GaveUp.
    One log line when retries start; each retry only at debug level.
    """
    deadline = clock() + within
    delay, attempt = low, 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = str(exc) or type(exc).__name__
            hint = exc.retry_after if isinstance(exc, ControllerError) else None
            left = deadline - clock()
            wait = min(delay * random.uniform(0.8, 1.2), left)  # one last try at the deadline
            if hint is not None:
                wait = max(wait, hint)
            if left <= 0 or wait > left:
                raise GaveUp(
                    f"{what}: the controller was not available for {within:g} s ({reason})"
                ) from exc
            attempt += 1
            extra = {"call": what, "error": reason, "delay": round(wait, 2), "attempt": attempt}
            if attempt == 1:
                log.warning("controller not available, retrying", extra=extra)
            else:
                log.debug("retrying", extra=extra)
            await sleep(wait)
            delay = min(delay * 2, high)


class TrustError(Exception):
    """The controller's CA does not match the hash the operator gave."""


async def fetch_pinned_ca(url: str, expected_hash: str) -> str:
    """The controller's CA (PEM), fetched unverified once and accepted only if its
    public-key hash is ``expected_hash`` (given with the join token).

    ``url`` may list replicas (comma-separated): they share the cluster CA, so the
    first that answers will do."""
    from cladnet.keys import ca_hash

    urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    async with httpx.AsyncClient(verify=False, timeout=10.0) as http:  # checked below
        for i, replica in enumerate(urls):
            try:
                response = await http.get(f"{replica}/v1/ca")
                break
            except httpx.TransportError:
                if i == len(urls) - 1:
                    raise
        _raise_for(response)
        pem = str(response.json()["ca_pem"])
    actual = ca_hash(pem)
    if actual != expected_hash.strip().lower():
        raise TrustError(
            f"controller CA hash {actual} does not match --ca-hash {expected_hash}: "
            "refusing to trust it"
        )
    return pem


class ControllerClient:
    """The controller replicas (comma-separated URLs) and, after joining, this host's
    credential. A connection failure moves to the next replica; one-shot calls try
    each replica once before giving up."""

    def __init__(
        self,
        url: str,
        credential: str | None = None,
        timeout: float = 10.0,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("no controller URL given")
        self._current = 0
        self.credential = credential
        if isinstance(verify, str):  # a pinned CA file
            verify = ssl.create_default_context(cafile=verify)
        self._timeout, self._verify = timeout, verify
        self._http = self._new_http()

    @property
    def url(self) -> str:
        return self.urls[self._current]

    def _new_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=self._timeout, verify=self._verify)

    async def _fail_over(self) -> None:
        """Switch to the next replica (no-op with a single URL beyond a fresh pool)."""
        self._current = (self._current + 1) % len(self.urls)
        await self.reconnect()

    async def close(self) -> None:
        await self._http.aclose()

    async def reconnect(self) -> None:
        """Drop pooled connections: after a local address change they are bound to a
        source address that no longer exists and would only time out."""
        old, self._http = self._http, self._new_http()
        await old.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"} if self.credential else {}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(len(self.urls)):
            try:
                response = await self._http.request(
                    method, path, json=body, headers=self._headers()
                )
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError):
                if attempt == len(self.urls) - 1:
                    raise
                await self._fail_over()
        _raise_for(response)
        return response.json() if response.content else None

    async def join(self, token: str, **fields: Any) -> dict[str, Any]:
        """Join a network with a join token; stores the returned credential."""
        result = await self._call("POST", "/v1/join", {"token": token, **fields})
        self.credential = result["credential"]
        return result

    async def rejoin(self, token: str, private_key: str, **fields: Any) -> dict[str, Any] | None:
        """Re-join as the host registered with ``private_key``'s public key, proving it
        holds the key by answering an X25519 challenge (the key itself is never sent).
        None when no host of the token's network has that key."""
        from cladnet.keys import answer_challenge, public_key_of

        public_key = public_key_of(private_key)
        try:
            challenge = await self._call(
                "POST", "/v1/join/challenge", {"token": token, "public_key": public_key}
            )
        except ControllerError as exc:
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

    async def heartbeat(self, host_id: str, **fields: Any) -> dict[str, Any]:
        return await self._call("POST", f"/v1/hosts/{host_id}/heartbeat", fields)

    async def update_endpoints(self, host_id: str, **fields: Any) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/hosts/{host_id}/endpoints", fields)

    async def metrics_credentials(self, host_id: str) -> dict[str, Any]:
        """Where and as whom to publish metrics (a fresh broker password each call)."""
        return await self._call("POST", f"/v1/hosts/{host_id}/metrics-credentials")

    async def pending_commands(self, host_id: str) -> list[dict[str, Any]]:
        """Commands this host is to run (asking tells the controller it accepts them)."""
        result = await self._call("GET", f"/v1/hosts/{host_id}/commands")
        return list(result["commands"])

    async def report_command(self, host_id: str, command_id: str, report: dict[str, Any]) -> None:
        """A command's state: ``running`` when it starts, then how it ended."""
        await self._call("POST", f"/v1/hosts/{host_id}/commands/{command_id}", report)

    async def leave(self, host_id: str) -> None:
        await self._call("DELETE", f"/v1/hosts/{host_id}")

    async def network(self, network_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/networks/{network_id}")

    async def list_peers(
        self, network_id: str, page: int = PEER_PAGE
    ) -> tuple[list[dict[str, Any]], int]:
        """The network's peers and the revision to watch from."""
        peers, revision, _ = await self.list_peers_and_policy(network_id, page)
        return peers, revision

    async def list_peers_and_policy(
        self, network_id: str, page: int = PEER_PAGE
    ) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
        """The network's peers, the revision to watch from and the policy (None from a
        controller without policies), in pages of ``page`` (all read at one revision; the
        policy comes with the last; a controller without paging sends all at once)."""
        for _ in range(3):  # a snapshot compacted between pages: list from the start
            peers: list[dict[str, Any]] = []
            params: dict[str, Any] = {"limit": page}
            try:
                while True:
                    path = f"/v1/networks/{network_id}/peers?{urlencode(params)}"
                    result = await self._call("GET", path)
                    peers += result["peers"]
                    if not result.get("continue"):
                        return peers, result["revision"], result.get("policy")
                    params["continue"] = result["continue"]
            except WatchGone:
                if "continue" not in params:
                    raise
        raise ControllerError(410, "continue_expired", "the peer list kept changing under us")

    async def watch_peers(self, network_id: str, since: int) -> AsyncIterator[dict[str, Any]]:
        """Peer events after ``since``; raises WatchGone (list again) or httpx errors (resume)."""
        params = {"watch": "true", "since": str(since)}
        # The controller sends keep-alive lines (every 15 s by default): a read that
        # waits 45 s means the path is dead and the watch must be resumed.
        timeout = httpx.Timeout(10.0, read=45.0)
        try:
            async with self._http.stream(
                "GET",
                f"/v1/networks/{network_id}/peers",
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
