"""Errors the service answers with: an HTTP status plus ``{"error": {"code", "message", "field"}}``.

Every failure a client can cause or see is an ``ApiError``; anything else is a bug and becomes a
500 ``internal_error`` carrying only the request id (the traceback goes to the log, never the client).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failure with a stable machine-readable ``code`` and a message meant for the caller."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}


def internal_error(request_id: str) -> ApiError:
    return ApiError(
        500, "internal_error", f"unexpected error; quote request id {request_id} when reporting it"
    )
