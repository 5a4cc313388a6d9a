"""Pure-ASGI middleware: the request id, one log line per request, request metrics, nosniff."""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any, Final

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.jsonutil import dumps
from app.logging import HotLogger
from app.validation import is_valid_instance

_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes and scrapes arrive every few seconds: their lines are debug, not info.
_QUIET_ROUTES: Final = frozenset({"/health", "/metrics"})
_INTERNAL_ERROR: Final = dumps({"detail": "internal error"})
# Every response: a browser never guesses a type other than the one declared.
_NOSNIFF: Final = (b"x-content-type-options", b"nosniff")

log = structlog.get_logger("app.access")
access_log = HotLogger("app.access")


class RequestContextMiddleware:
    """Binds `X-Request-ID` (the caller's, or a new one) for every log line and echoes it,
    with `X-Content-Type-Options: nosniff`.

    Handlers add fields to the request's log line through `scope["state"]["log"]`.
    An exception no handler turned into a response becomes a JSON 500 here, so the
    caller still gets `{"detail": ...}` and the request id, and the request's one
    log line carries the traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        fields: dict[str, Any] = {}
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log"] = fields
        status = 500
        response_started = False
        started = time.perf_counter()
        added = [(b"x-request-id", request_id.encode()), _NOSNIFF]

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        error: Exception | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            error = exc
            if response_started:
                # Too late for a 500: uvicorn logs it (with the request id still
                # bound) and closes the connection, so the client sees a cut response.
                _observe(scope, status, time.perf_counter() - started, fields, error)
                raise
            await _send_internal_error(send_with_id)
        _observe(scope, status, time.perf_counter() - started, fields, error)
        structlog.contextvars.reset_contextvars(**tokens)


def _observe(
    scope: Scope, status: int, seconds: float, fields: dict[str, Any], error: Exception | None
) -> None:
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    method = scope["method"] if scope["method"] in _METHODS else "other"
    metrics.child(metrics.HTTP_REQUESTS, method, route, str(status)).inc()
    metrics.child(metrics.HTTP_DURATION, method, route).observe(seconds)
    line: dict[str, Any] = {
        "method": scope["method"],
        "path": scope["path"],
        "instance": _path_instance(scope),
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "cache_hits": 0,
        "cache_misses": 0,
        "crm_calls": 0,
        **fields,
    }
    if error is not None:
        log.error("request", **line, exc_info=error)  # rare: structlog renders the traceback
    elif status >= 500:
        access_log.log(logging.WARNING, "request", line)
    elif route in _QUIET_ROUTES:
        access_log.log(logging.DEBUG, "request", line)
    else:
        access_log.log(logging.INFO, "request", line)


def _path_instance(scope: Scope) -> str | None:
    instance = scope.get("path_params", {}).get("instance")
    return instance if isinstance(instance, str) and is_valid_instance(instance) else None


async def _send_internal_error(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_INTERNAL_ERROR)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _INTERNAL_ERROR})


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _VALID_REQUEST_ID.match(value):
                return bytes(value).decode()
            break
    # 128 random bits as 32 hex digits, like a uuid4's hex, without its system call (an id to
    # correlate lines by, not a secret; each worker process seeds its own `random`)
    return f"{random.getrandbits(128):032x}"
