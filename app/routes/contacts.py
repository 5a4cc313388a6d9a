"""`GET /contacts`: the upstream's page of contacts with `customer` and `user` embedded."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote_plus

from fastapi import APIRouter, Query, Request, Response

from app.contacts import ContactsService
from app.errors import AppError
from app.validation import INSTANCE_PATTERN

router = APIRouter(tags=["contacts"])


class AmbiguousInstance(AppError):
    status_code = 422
    detail = "instance must be given once"


@router.get(
    "/contacts",
    response_class=Response,
    responses={
        200: {
            "description": "The upstream page, each item with `customer` and `user` added",
            "content": {"application/json": {}},
            "headers": {
                "Server-Timing": {
                    "description": "`redis;dur=<ms>`: time spent waiting on Redis; "
                    "`crm;dur=<ms>` when the request waited for the CRM"
                },
                "X-Enrichment": {
                    "description": "complete; stale (some objects past their TTL, the CRM "
                    "failing); partial (some objects null because the CRM failed)"
                },
            },
        },
        502: {"description": "The contacts API failed"},
        504: {"description": "The contacts API timed out"},
    },
)
async def list_contacts(
    request: Request,
    instance: Annotated[str, Query(pattern=INSTANCE_PATTERN, description="instance (tenant) name")],
) -> Response:
    """Every other query parameter (paging, search, filters) goes to the upstream unchanged."""
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
    return Response(page.body, media_type="application/json", headers=headers)


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
