"""API errors: every failure leaves as ``{"error": CODE, "message": TEXT}`` with a 4xx/5xx."""

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


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def not_found(what: str, ref: str) -> ApiError:
    return ApiError(404, f"{what}_not_found", f"{what} {ref!r} does not exist")


def conflict(code: str, message: str) -> ApiError:
    return ApiError(409, code, message)
