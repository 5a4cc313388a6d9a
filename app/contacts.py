"""The enrichment: a page of contacts -> its ids -> cache -> CRM -> the same page, enriched.

The request path of docs/design.md; `EntityResolver` does steps 4 to 6. The page is returned
with every upstream field kept and `customer` and `user` added; cached CRM
objects are spliced in as raw JSON (`orjson.Fragment`), never re-parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import structlog

from app import jsonutil, metrics
from app.admission import Admission, Slot
from app.entities import Entity
from app.errors import BadGateway, ClientGone
from app.resolver import EntityResolver, Resolution
from app.upstream import ContactsPage, Upstream
from app.validation import normalize_id

log = structlog.get_logger("app.contacts")

#: A page of more contacts than this lets other requests run before its ids are read.
_YIELD_EVERY = 5_000
#: Integers within this bound are ids as their decimal text (at most 64 characters with a
#: sign, app.validation); larger ones take `normalize_id`.
_INT_ID_BOUND = 10**63

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
        items = page.items
        raw_customers: list[object] = []
        raw_users: list[object] = []
        customer_ids: list[str | None] = []
        user_ids: list[str | None] = []
        # Runs for every contact of every request: each step one comprehension over the page
        # (over 5,000 contacts at a time, letting other requests run in between).
        for start in range(0, len(items), _YIELD_EVERY):
            if start:
                await asyncio.sleep(0)
            chunk = items[start : start + _YIELD_EVERY]
            customers = [item.get("customerId") for item in chunk]
            users = [item.get("userId") for item in chunk]
            raw_customers += customers
            raw_users += users
            customer_ids += _normalized(customers)
            user_ids += _normalized(users)
        if customer_ids.count(None) != raw_customers.count(None) or user_ids.count(
            None
        ) != raw_users.count(None):
            invalid = [
                raw
                for raws, ids in ((raw_customers, customer_ids), (raw_users, user_ids))
                for raw, valid in zip(raws, ids, strict=True)
                if raw is not None and valid is None
            ]
            log.warning(
                "contacts.invalid_ids",
                instance=instance,
                count=len(invalid),
                sample=[repr(value)[:80] for value in invalid[:3]],
                request_id=request_id,
            )
        wanted: dict[Entity, Sequence[str]] = {
            "customer": _unique(customer_ids),
            "user": _unique(user_ids),
        }

        resolution = await self._resolver.resolve(
            instance, wanted, authorization, request_id, slot=slot
        )
        try:
            body = _assemble(
                page.body, items, customer_ids, user_ids, resolution, exact=page.exotic
            )
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


def _normalized(raws: list[object]) -> list[str | None]:
    """`normalize_id` of each raw reference, None kept; integers (the common case) inline."""
    return [
        str(raw)
        if type(raw) is int and -_INT_ID_BOUND < raw < _INT_ID_BOUND
        else None
        if raw is None
        else normalize_id(raw)
        for raw in raws
    ]


def _unique(ids: list[str | None]) -> list[str]:
    """The distinct ids, in order of first appearance, without None."""
    distinct = dict.fromkeys(ids)
    distinct.pop(None, None)
    return cast(list[str], list(distinct))


def _embedded(
    found: dict[str, bytes | None], embed: Callable[[bytes], Any]
) -> dict[str | None, Any]:
    """The objects to embed by id; ids without one (`None`) left out."""
    if None in found.values():
        return {i: embed(raw) for i, raw in found.items() if raw is not None}
    return dict(zip(found, map(embed, cast(Iterable[bytes], found.values())), strict=True))


def _assemble(
    body: dict[str, object],
    items: list[dict[str, object]],
    customer_ids: list[str | None],
    user_ids: list[str | None],
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
    values = resolution.values
    customers, users = _embedded(values["customer"], embed), _embedded(values["user"], embed)
    # (`get(None)` is None: no id, no object)
    for item, customer, user in zip(
        items, map(customers.get, customer_ids), map(users.get, user_ids), strict=True
    ):
        item["customer"] = customer
        item["user"] = user
    return jsonutil.dumps(body, exact=exact)
