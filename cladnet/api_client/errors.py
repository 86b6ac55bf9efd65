"""What a call to a CLADNet API raises: one error for every answer in the shared
``{"error": CODE, "message": TEXT}`` shape, plus the few the callers act on."""

from __future__ import annotations

import email.utils
import time
from typing import Any


class ApiClientError(Exception):
    """An error answer: HTTP ``status``, ``code`` (the body's ``error``), ``message``, and
    ``retry_after`` in seconds when the server sent a ``Retry-After``.

    ``status`` 0 means no HTTP answer at all (the sync transport's refused connection or
    untrusted certificate; the async one raises those as httpx errors, which the agent
    retries)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class WatchGone(ApiClientError):
    """410: the revision or continue token was compacted: list again from the start."""


class TrustError(Exception):
    """The controller's CA does not match the hash the operator gave."""


def pinned(pem: str, expected_hash: str) -> str:
    """``pem``, if its hash is the one the operator gave; else :class:`TrustError`."""
    from cladnet.keys import ca_hash  # cryptography: only when a CA is pinned

    actual = ca_hash(pem)
    if actual != expected_hash.strip().lower():
        raise TrustError(
            f"controller CA hash {actual} does not match --ca-hash {expected_hash}: "
            "refusing to trust it"
        )
    return pem


class GaveUp(Exception):
    """Transient failures went on for longer than the caller was willing to wait."""


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


def error_for(status: int, body: Any, text: str, retry_after_header: str | None) -> ApiClientError:
    """The error an answer with ``status`` (>= 400) stands for: ``body`` is its parsed JSON
    (None when it was not JSON), ``text`` its raw text."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code, message = body["error"], str(body.get("message", ""))
    else:
        code, message = "http_error", text[:200]
    cls = WatchGone if status == 410 else ApiClientError
    return cls(status, code, message, retry_after(retry_after_header))
