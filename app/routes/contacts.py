"""`GET /contacts`: the upstream's page of contacts with `customer` and `user` embedded."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote_plus

from fastapi import APIRouter, Query, Request, Response
from starlette.background import BackgroundTask

from app import memory
from app.contacts import ContactsService
from app.errors import AppError
from app.routes.schemas import (
    REQUEST_ID_HEADER,
    VALIDATION_FAILED,
    ContactsPage,
    ErrorDetail,
)
from app.validation import INSTANCE_PATTERN

router = APIRouter(tags=["contacts"])


class AmbiguousInstance(AppError):
    status_code = 422
    detail = "instance must be given once"


_UPSTREAM_BODY = {
    "application/json": {
        "schema": {
            "description": "the contacts API's JSON body as it sent it, or "
            '`{"detail": ...}` when its body was not JSON'
        }
    }
}


@router.get(
    "/contacts",
    response_class=Response,
    responses={
        200: {
            "model": ContactsPage,
            "description": "The upstream page, each item with `customer` and `user` added",
            "headers": {
                "X-Enrichment": {
                    "description": "complete; stale (some objects past their TTL, the CRM "
                    "failing); partial (some objects null because the CRM failed)",
                    "schema": {"type": "string", "enum": ["complete", "stale", "partial"]},
                },
                "Server-Timing": {
                    "description": "`redis;dur=<ms>`: time spent waiting on Redis, every "
                    "round trip together; then `, crm;dur=<ms>` when the request waited for "
                    "the CRM",
                    "schema": {"type": "string"},
                },
                **REQUEST_ID_HEADER,
            },
        },
        401: {
            "description": "The contacts API refused the caller's `Authorization` "
            "(its status and JSON body, passed through)",
            "content": _UPSTREAM_BODY,
        },
        403: {
            "description": "The contacts API denied access (passed through)",
            "content": _UPSTREAM_BODY,
        },
        404: {
            "description": "The contacts API does not know the instance (passed through)",
            "content": _UPSTREAM_BODY,
        },
        "4XX": {
            "description": "Any other 4xx of the contacts API, passed through the same way",
            "content": _UPSTREAM_BODY,
        },
        **VALIDATION_FAILED,
        502: {
            "model": ErrorDetail,
            "description": "The contacts API failed: 5xx, unreachable, a body that is not "
            "the expected JSON or is larger than `UPSTREAM_MAX_BODY_BYTES`",
        },
        503: {
            "model": ErrorDetail,
            "description": "Overloaded: the request could not start within "
            "`ADMISSION_QUEUE_TIMEOUT_SECONDS` and was shed before any work; retry later",
            "headers": {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            },
        },
        504: {
            "model": ErrorDetail,
            "description": "The contacts API did not answer within `UPSTREAM_TIMEOUT_SECONDS`",
        },
    },
)
async def list_contacts(
    request: Request,
    instance: Annotated[
        str,
        Query(
            pattern=INSTANCE_PATTERN,
            description="instance (tenant) name",
            openapi_examples={
                "known": {"summary": "an instance of the simulated upstream", "value": "acme"},
                "unknown": {
                    "summary": "an instance the simulated upstream does not know: its 404",
                    "value": "unknown-tenant",
                },
            },
        ),
    ],
) -> Response:
    """Every other query parameter (paging, search, filters) goes to the upstream unchanged.

    The caller's `Authorization` goes to the contacts API (and to the CRM when
    `CRM_API_TOKEN` is unset). Request heads above 64 KiB are refused by the server
    (431) before they reach the service.
    """
    query = _forwarded_query(request.scope["query_string"])
    state = request.scope["state"]
    state["log"]["instance"] = instance
    # Straight from the lifespan state rather than a dependency: FastAPI's dependency
    # solving is a measurable share of a warm request.
    service: ContactsService = state["contacts"]
    page = await service.enriched_page(
        instance,
        query,
        request.headers.get("authorization"),
        state["request_id"],
        client_gone=request.is_disconnected,
    )
    state["log"].update(
        contacts=page.contacts,
        cache_hits=page.hits,
        cache_misses=page.misses,
        crm_calls=page.crm_calls,
        refreshes=page.refreshes,
        enrichment=page.enrichment,
    )
    # Server-Timing shows in browsers' dev tools and tells callers (and tests) what the
    # request waited for: Redis (all its round trips) and, when it had misses, the CRM.
    timing = f"redis;dur={page.redis_wait * 1000:.1f}"
    if page.crm_wait:
        timing += f", crm;dur={page.crm_wait * 1000:.1f}"
    headers: dict[str, str] = {"x-enrichment": page.enrichment, "server-timing": timing}
    # After a huge page is sent, its memory is freed: hand it back to the system then.
    after = BackgroundTask(memory.release_soon) if page.huge else None
    return Response(page.body, media_type="application/json", headers=headers, background=after)


def _forwarded_query(raw: bytes) -> str:
    """The raw query string without `instance`, byte for byte otherwise."""
    kept: list[str] = []
    seen_instance = False
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        name = unquote_plus(part.partition("=")[0])
        if name == "instance":
            if seen_instance:
                raise AmbiguousInstance()
            seen_instance = True
            continue
        kept.append(part)
    return "&".join(kept)
