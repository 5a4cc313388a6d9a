"""Errors the service produces, each with its HTTP status, and the one handler."""

from __future__ import annotations

from typing import ClassVar

from fastapi import Request
from fastapi.responses import Response

from app.jsonutil import dumps


class AppError(Exception):
    """Base error: rendered as `{"detail": message}` with `status_code`."""

    status_code = 500
    detail = "internal error"
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.detail)
        self.detail = detail or self.detail


class BadGateway(AppError):
    """The WhatsApp API failed (5xx, unreachable, or a body that is not the expected JSON)."""

    status_code = 502
    detail = "upstream contacts API failed"


class GatewayTimeout(AppError):
    """The WhatsApp API did not answer within `UPSTREAM_TIMEOUT_SECONDS`."""

    status_code = 504
    detail = "upstream contacts API timed out"


class ClientGone(AppError):
    """The client disconnected while its request waited for a turn (app.admission): the
    request is dropped unserved. 499, as nginx logs it; nobody receives the response."""

    status_code = 499
    detail = "client closed the request"


class UpstreamRejected(Exception):
    """The WhatsApp API answered 4xx: its status goes to the caller, with `body`, always JSON
    (the upstream's own when it was JSON, else `{"detail": ...}`: app.upstream decides)."""

    def __init__(self, status_code: int, body: bytes) -> None:
        super().__init__(status_code)
        self.status_code = status_code
        self.body = body


async def app_error_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return Response(
        dumps({"detail": exc.detail}),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


async def upstream_rejected_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, UpstreamRejected)
    return Response(exc.body, status_code=exc.status_code, media_type="application/json")


class NotFound(AppError):
    status_code = 404
    detail = "not found"


class Unauthorized(AppError):
    status_code = 401
    detail = "missing or invalid bearer token"
    headers: ClassVar[dict[str, str] | None] = {"www-authenticate": "Bearer"}


class Overloaded(AppError):
    """The request waited `ADMISSION_QUEUE_TIMEOUT_SECONDS` for a turn (app.admission): shed."""

    status_code = 503
    detail = "overloaded: try again shortly"
    headers: ClassVar[dict[str, str] | None] = {"retry-after": "1"}
