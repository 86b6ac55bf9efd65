"""API errors: every failure leaves as ``{"error": CODE, "message": TEXT}`` with a 4xx/5xx."""

from __future__ import annotations

from cladnet.api_errors import ApiError

__all__ = ["ApiError", "bad_request", "conflict", "not_found"]


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def not_found(what: str, ref: str) -> ApiError:
    return ApiError(404, f"{what}_not_found", f"{what} {ref!r} does not exist")


def conflict(code: str, message: str) -> ApiError:
    return ApiError(409, code, message)
