"""Which failures are worth another try, and the backoff the agent retries them with."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from cladnet.api_client.errors import ApiClientError, GaveUp
from cladnet.backoff import Backoff

# The agent is the one that retries: its log lines stay under its logger.
log = logging.getLogger("cladnet.agent")

T = TypeVar("T")

# Answers that say "not now" rather than "no": the controller restarts, its etcd
# is away, or it limits joins from this address.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# What talking to the controller raises when the network or the controller is away.
NETWORK_ERRORS = (httpx.HTTPError, OSError)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer at all (refused, reset, timed out) or a "not now"."""
    if isinstance(exc, ApiClientError):
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
    backoff, attempt = Backoff(low, high), 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = str(exc) or type(exc).__name__
            hint = exc.retry_after if isinstance(exc, ApiClientError) else None
            left = deadline - clock()
            wait = min(backoff.next_delay(), left)  # one last try at the deadline
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
