"""The enrichment: a page of contacts -> its ids -> cache -> CRM -> the same page, enriched.

The request path of docs/design.md; `EntityResolver` does steps 4 to 6. The page is returned
with every upstream field kept and `customer` and `user` added; cached CRM
objects are spliced in as raw JSON (`orjson.Fragment`), never re-parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from app import jsonutil, metrics
from app.admission import Admission, Slot
from app.entities import ENTITIES, Entity
from app.errors import BadGateway, ClientGone
from app.resolver import EntityResolver, Resolution
from app.upstream import ContactsPage, Upstream
from app.validation import normalize_id

log = structlog.get_logger("app.contacts")

_REF_FIELD: dict[Entity, str] = {"customer": "customerId", "user": "userId"}
#: A page of more contacts than this lets other requests run every so many contacts.
_YIELD_EVERY = 5_000

Enrichment = Literal["complete", "stale", "partial"]


@dataclass(frozen=True, slots=True)
class EnrichedPage:
    """The response body and what it took to build it (for headers and the request log)."""

    body: bytes
    enrichment: Enrichment
    contacts: int
    hits: int
    misses: int
    crm_calls: int
    refreshes: int
    crm_wait: float
    redis_wait: float

    @property
    def huge(self) -> bool:
        """A page large enough that its memory is worth handing back once it is sent."""
        return self.contacts > _YIELD_EVERY


class ContactsService:
    """Serves one enriched page of contacts of one instance."""

    def __init__(self, upstream: Upstream, resolver: EntityResolver, admission: Admission) -> None:
        self._upstream = upstream
        self._resolver = resolver
        self._admission = admission

    async def enriched_page(
        self,
        instance: str,
        query: str,
        authorization: str | None,
        request_id: str,
        client_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> EnrichedPage:
        """The enriched page; raises `ClientGone` when the client left while the request
        waited for its turn (`client_gone` tells), and the upstream's errors."""
        # A request starts in turn with at most MAX_ACTIVE_REQUESTS others (app.admission),
        # or is shed before any work; it gives the turn back while it waits on the contacts
        # API and on the CRM, and takes it again ahead of the requests not yet started.
        async with self._admission.slot() as slot:
            # Under overload, no work for nobody. (Starlette's check reads the request's
            # one body message: fine for this bodiless GET, which never reads its body.)
            if slot.waited and client_gone is not None and await client_gone():
                raise ClientGone()
            slot.pause()
            page = await self._upstream.contacts(instance, query, authorization, request_id)
            await slot.resume()
            return await self._enrich(instance, page, authorization, request_id, slot)

    async def _enrich(
        self,
        instance: str,
        page: ContactsPage,
        authorization: str | None,
        request_id: str,
        slot: Slot,
    ) -> EnrichedPage:
        customers: dict[str, None] = {}
        users: dict[str, None] = {}
        wanted: dict[Entity, dict[str, None]] = {"customer": customers, "user": users}
        refs: list[tuple[str | None, str | None]] = []
        invalid: list[object] = []
        huge = len(page.items) > _YIELD_EVERY
        # Runs for every contact of every request: both references unrolled, no inner loop.
        for n, item in enumerate(page.items):
            if huge and not n % _YIELD_EVERY:
                await asyncio.sleep(0)  # a very large page lets other requests run
            raw_customer = item.get(_REF_FIELD["customer"])
            raw_user = item.get(_REF_FIELD["user"])
            customer_id = user_id = None
            if raw_customer is not None:
                customer_id = normalize_id(raw_customer)
                if customer_id is None:
                    invalid.append(raw_customer)
                else:
                    customers[customer_id] = None
            if raw_user is not None:
                user_id = normalize_id(raw_user)
                if user_id is None:
                    invalid.append(raw_user)
                else:
                    users[user_id] = None
            refs.append((customer_id, user_id))
        if invalid:
            log.warning(
                "contacts.invalid_ids",
                instance=instance,
                count=len(invalid),
                sample=[repr(value)[:80] for value in invalid[:3]],
                request_id=request_id,
            )

        resolution = await self._resolver.resolve(
            instance, {e: list(wanted[e]) for e in ENTITIES}, authorization, request_id, slot=slot
        )
        try:
            body = _assemble(page.body, page.items, refs, resolution, exact=page.exotic)
        except jsonutil.InvalidJSON as exc:
            # The page parsed, yet cannot be written as strict JSON (nested too deeply).
            log.warning(
                "contacts.unservable_page", instance=instance, error=str(exc), request_id=request_id
            )
            raise BadGateway(
                "upstream contacts API answered a page that cannot be served"
            ) from None
        enrichment: Enrichment = (
            "partial" if not resolution.complete else "stale" if resolution.stale else "complete"
        )
        metrics.child(metrics.ENRICHMENT, enrichment).inc()
        return EnrichedPage(
            body=body,
            enrichment=enrichment,
            contacts=len(page.items),
            hits=resolution.hits,
            misses=resolution.misses,
            crm_calls=resolution.crm_calls,
            refreshes=resolution.refreshes,
            crm_wait=resolution.crm_wait,
            redis_wait=resolution.redis_wait,
        )


def _assemble(
    body: dict[str, object],
    items: list[dict[str, object]],
    refs: list[tuple[str | None, str | None]],
    resolution: Resolution,
    *,
    exact: bool,
) -> bytes:
    """Add `customer` and `user` to each item and encode the page once.

    `exact` bodies (integers orjson cannot hold) are encoded by the standard
    library, so the cached objects are parsed there instead of spliced. Raises
    `jsonutil.InvalidJSON` when the page cannot be strict JSON.
    """
    embed = jsonutil.loads if exact else jsonutil.Fragment
    embedded: dict[Entity, dict[str, object]] = {
        entity: {
            entity_id: embed(raw)
            for entity_id, raw in resolution.values[entity].items()
            if raw is not None
        }
        for entity in ENTITIES
    }
    customers, users = embedded["customer"], embedded["user"]
    for item, (customer_id, user_id) in zip(items, refs, strict=True):
        item["customer"] = customers.get(customer_id) if customer_id is not None else None
        item["user"] = users.get(user_id) if user_id is not None else None
    return jsonutil.dumps(body, exact=exact)
