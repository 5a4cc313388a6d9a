"""Pure-ASGI middleware: the request id, one log line per request, and request metrics."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics

_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")

log = structlog.get_logger("app.access")


class RequestContextMiddleware:
    """Binds `X-Request-ID` (the caller's, or a new one) for every log line and echoes it.

    Handlers add fields to the request's log line through `scope["state"]["log"]`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        fields: dict[str, Any] = {}
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["log"] = fields
        status = 500
        started = time.perf_counter()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            route_name = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(method=method, route=route_name, status=status).inc()
            metrics.HTTP_DURATION.labels(method=method, route=route_name).observe(seconds)
            if route_name not in ("/health", "/metrics"):
                log.info(
                    "request",
                    method=method,
                    path=scope["path"],
                    status=status,
                    duration_ms=round(seconds * 1000, 2),
                    **fields,
                )
            structlog.contextvars.unbind_contextvars("request_id")


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _VALID_REQUEST_ID.match(value):
                return value.decode()
            break
    return uuid.uuid4().hex
