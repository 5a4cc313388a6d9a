"""`GET /contacts`: the upstream's page of contacts with `customer` and `user` embedded."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote_plus

from fastapi import APIRouter, Query, Request, Response
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from app import memory
from app.contacts import ContactsService, EnrichedPage
from app.errors import AppError, UpstreamRejected, app_error_handler, upstream_rejected_handler
from app.routes.schemas import (
    REQUEST_ID_HEADER,
    VALIDATION_FAILED,
    ContactsPage,
    ErrorDetail,
)
from app.validation import INSTANCE_PATTERN, is_valid_instance

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
    page = await _enriched(
        request.scope, request.receive, instance, _forwarded_query(request.scope["query_string"])
    )
    return Response(
        page.body,
        media_type="application/json",
        headers=_headers(page),
        background=BackgroundTask(memory.release_soon) if page.huge else None,
    )


async def _enriched(scope: Scope, receive: Receive, instance: str, query: str) -> EnrichedPage:
    """The page of one valid request, its log fields set: what both ways in serve."""
    state = scope["state"]
    fields = state["log"]
    fields["instance"] = instance
    # Straight from the lifespan state rather than a dependency: FastAPI's dependency
    # solving is a measurable share of a warm request.
    service: ContactsService = state["contacts"]
    page = await service.enriched_page(
        instance,
        query,
        _authorization(scope),
        state["request_id"],
        client_gone=lambda: Request(scope, receive).is_disconnected(),
    )
    fields["contacts"] = page.contacts
    fields["cache_hits"] = page.hits
    fields["cache_misses"] = page.misses
    fields["crm_calls"] = page.crm_calls
    fields["refreshes"] = page.refreshes
    fields["enrichment"] = page.enrichment
    return page


def _headers(page: EnrichedPage) -> dict[str, str]:
    # Server-Timing shows in browsers' dev tools and tells callers (and tests) what the
    # request waited for: Redis (all its round trips) and, when it had misses, the CRM.
    timing = f"redis;dur={page.redis_wait * 1000:.1f}"
    if page.crm_wait:
        timing += f", crm;dur={page.crm_wait * 1000:.1f}"
    return {"x-enrichment": page.enrichment, "server-timing": timing}


def _authorization(scope: Scope) -> str | None:
    """The caller's `Authorization`, as Starlette reads it: the first, latin-1."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None


class FastContacts:
    """`GET /contacts` as plain ASGI, for the requests whose query is valid: the same
    answers as the route above, without FastAPI's routing, middleware stack and parameter
    validation, which were a sixth of a warm request's CPU (docs/performance.md).

    `fast_query` decides which requests come here; every other one (a missing, invalid or
    repeated `instance`) takes the FastAPI route, whose 422 is the documented one, so
    the two ways in cannot disagree on what is valid.
    """

    def __init__(self, route: object) -> None:
        self.route = route  # for the request metrics' route label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        instance, query = scope[FAST_QUERY]
        scope["route"] = self.route
        try:
            page = await _enriched(scope, receive, instance, query)
        except AppError as exc:
            await (await app_error_handler(Request(scope), exc))(scope, receive, send)
            return
        except UpstreamRejected as exc:
            await (await upstream_rejected_handler(Request(scope), exc))(scope, receive, send)
            return
        body = page.body
        # As Starlette's Response writes them: its headers, then length and type.
        headers = [
            (name.encode(), value.encode("latin-1")) for name, value in _headers(page).items()
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if page.huge:
            await memory.release_soon()


#: The scope key under which `fast_query`'s answer reaches `FastContacts`.
FAST_QUERY = "app.contacts_query"


def fast_query(raw: bytes) -> tuple[str, str] | None:
    """The instance and the query to forward when `raw` names exactly one valid instance;
    None otherwise."""
    instances, query = _split_query(raw)
    if len(instances) != 1 or not is_valid_instance(instances[0]):
        return None
    return instances[0], query


def _forwarded_query(raw: bytes) -> str:
    """The raw query string without `instance`, byte for byte otherwise."""
    instances, query = _split_query(raw)
    if len(instances) > 1:
        raise AmbiguousInstance()
    return query


def _split_query(raw: bytes) -> tuple[list[str], str]:
    """The values of `instance`, as Starlette parses a query (split on `&`, then on the
    first `=`, each side unquoted), and the query without them, byte for byte otherwise."""
    instances: list[str] = []
    kept: list[str] = []
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if name == "instance" or (
            ("%" in name or "+" in name) and unquote_plus(name) == "instance"
        ):
            instances.append(unquote_plus(value))
        else:
            kept.append(part)
    return instances, "&".join(kept)
