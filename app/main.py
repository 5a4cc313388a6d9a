"""The application factory: routers, middleware and error handlers."""

from __future__ import annotations

import gc
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __doc__ as description
from app.config import Settings, get_settings
from app.errors import AppError, UpstreamRejected, app_error_handler, upstream_rejected_handler
from app.jsonutil import dumps
from app.lifespan import lifespan_for
from app.logging import configure_logging
from app.middleware import RequestContextMiddleware
from app.routes import cache_admin, contacts, health


async def _validation_error_handler(_: Any, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}
        for error in exc.errors()
    ]
    return Response(dumps({"detail": errors}), status_code=422, media_type="application/json")


class Service(FastAPI):
    """The FastAPI application, with `GET /contacts` served around FastAPI's stack when
    its query is valid (app.routes.contacts.FastContacts): the same middleware, answers
    and OpenAPI entry, a sixth less CPU on a warm request. `fast_contacts = False` sends
    every request through FastAPI (tests compare the two)."""

    fast_contacts = True
    _fast: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/contacts"
            and scope["method"] == "GET"
            and self.fast_contacts
            and not scope.get("root_path")
        ):
            query = contacts.fast_query(scope["query_string"])
            if query is not None:
                if self._fast is None:
                    self._fast = RequestContextMiddleware(contacts.FastContacts(self._route()))
                scope["app"] = self
                scope[contacts.FAST_QUERY] = query
                await self._fast(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _route(self) -> APIRoute:
        return next(
            route
            for route in contacts.router.routes
            if isinstance(route, APIRoute) and route.path == "/contacts"
        )


def create_app(settings: Settings | None = None) -> Service:
    """Build the service; `settings` defaults to the environment (tests pass their own)."""
    settings = settings or get_settings()
    tokens = (settings.crm_api_token, settings.admin_token, settings.cache_scope_secret)
    secrets = [s.get_secret_value() for s in tokens if s]
    redis_password = urlsplit(settings.redis_url).password
    configure_logging(
        settings.log_level,
        settings.log_format,
        secrets=[*secrets, *([redis_password] if redis_password else [])],
    )
    app = Service(
        title="Enriched contacts",
        description=description or "",
        version="0.1.0",
        lifespan=lifespan_for(settings),  # type: ignore[arg-type]
    )
    app.add_middleware(RequestContextMiddleware)
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(UpstreamRejected, upstream_rejected_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.include_router(contacts.router)
    app.include_router(health.router)
    app.include_router(cache_admin.router)
    return app


def tune_gc() -> None:
    """Garbage-collect for a server: rarely, and never through the start-up objects.

    A warm request allocates a few thousand containers (the parsed page) that die by
    reference counting. At CPython's default threshold (700) the collector ran
    several times per request over every page in flight, and its full collections
    walked the whole framework: a third of a warm request's CPU and 100 ms pauses
    (bench/README.md). Frozen start-up objects are never walked again; 50,000 net
    new containers between collections is ~10 MB of cyclic garbage at most.

    Start-up is not collected first: `python -m app` imports with the collector off
    (app/__main__.py), and the ~1,100 objects a full collection would then find
    (~0.3 MB of import-time cycles) are frozen with the rest, as the `gc.freeze`
    documentation advises for a server. The collector's ~200 runs during the imports
    and that collection were 0.2 s of a 1.1 s start-up (docs/performance.md).
    Enabling it here also covers each worker of `--workers N`.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    gc.enable()


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app on first access, so importing this
    # module (tests, tools) never requires the environment to be configured.
    if name == "app":
        application = create_app()
        tune_gc()
        globals()["app"] = application
        return application
    raise AttributeError(name)
