"""The error every CLADNet HTTP API raises; it leaves as ``{"error": CODE, "message": TEXT}``."""

from __future__ import annotations


class ApiError(Exception):
    """An error the client caused or must know about."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        # Seconds, sent as a Retry-After header: clients wait that long, not guess.
        self.retry_after = retry_after
