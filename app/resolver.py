"""Cache-aside resolution of CRM entities: one Redis read, the misses from the CRM, once.

Steps 4 to 6 of SPEC.md: read every key of a page in one round trip, fetch
only the misses from the CRM in batches run in parallel, and store what came
back (never a failure) with a pipelined `SET ... EX`.

Misses are fetched by a task of their own, not by the request that found
them: concurrent requests missing the same id await the same future (single
flight), and a client that disconnects cancels only its own wait, never a
CRM call or a Redis write that other requests depend on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from app import metrics
from app.cache import ENTITIES, Cache, Entity
from app.upstream import CrmError, Upstream

log = structlog.get_logger("app.resolver")

NEGATIVE: Final = b"null"


class _Failed:
    """The result of an id whose CRM batch failed: `null` for this request, and never cached."""


FAILED: Final = _Failed()

_Key = tuple[Entity, str, str]
_Result = bytes | None | _Failed


@dataclass(slots=True)
class Resolution:
    """What a page's ids resolved to: raw JSON of each object, None where there is none."""

    values: dict[Entity, dict[str, bytes | None]]
    complete: bool = True
    hits: int = 0
    misses: int = 0
    crm_calls: int = 0
    redis_ok: bool = True
    failed_ids: dict[Entity, list[str]] = field(default_factory=dict)


class EntityResolver:
    """Resolves customer and user ids of one instance through Redis, then the CRM."""

    def __init__(
        self,
        cache: Cache,
        upstream: Upstream,
        *,
        batch_size: int,
        ttl: int,
        negative_ttl: int,
    ) -> None:
        self._cache = cache
        self._upstream = upstream
        self._batch_size = batch_size
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._inflight: dict[_Key, asyncio.Future[_Result]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts: dict[str, list[int]] = {}

    async def resolve(
        self,
        instance: str,
        wanted: dict[Entity, Sequence[str]],
        authorization: str | None,
        request_id: str,
    ) -> Resolution:
        """Resolve unique, valid ids of each entity; never raises for Redis or CRM failures."""
        keys = [self._cache.entity_key(e, instance, i) for e in ENTITIES for i in wanted[e]]
        raws = await self._cache.read_raw(keys)
        resolution = Resolution(values={e: {} for e in ENTITIES}, redis_ok=raws is not None)
        misses: dict[Entity, list[str]] = {e: [] for e in ENTITIES}
        position = 0
        for entity in ENTITIES:
            values = resolution.values[entity]
            hits = 0
            for entity_id in wanted[entity]:
                raw = raws[position] if raws is not None else None
                position += 1
                if raw is None:
                    misses[entity].append(entity_id)
                else:
                    values[entity_id] = None if raw == NEGATIVE else raw
                    hits += 1
            if hits:
                metrics.CACHE_HITS.labels(entity=entity).inc(hits)
            if misses[entity]:
                metrics.CACHE_MISSES.labels(entity=entity).inc(len(misses[entity]))
            resolution.hits += hits
            resolution.misses += len(misses[entity])
        counts = self._counts.setdefault(instance, [0, 0])
        counts[0] += resolution.hits
        counts[1] += resolution.misses
        if resolution.misses:
            await self._fetch_misses(instance, misses, authorization, request_id, resolution)
        return resolution

    def forget(self, entity: Entity, instance: str, entity_id: str) -> None:
        """Drop an in-flight lookup so its result, fetched before an invalidation, is not cached."""
        self._inflight.pop((entity, instance, entity_id), None)

    def forget_instance(self, instance: str) -> None:
        """`forget` every in-flight lookup of one instance."""
        for key in [key for key in self._inflight if key[1] == instance]:
            del self._inflight[key]

    def counts(self, instance: str) -> tuple[int, int]:
        """Hits and misses of `instance` in this process since it started."""
        hits, misses = self._counts.get(instance, (0, 0))
        return hits, misses

    async def drain(self, seconds: float) -> None:
        """Let background fetches and writes finish (at shutdown), for at most `seconds`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=seconds)

    async def _fetch_misses(
        self,
        instance: str,
        misses: dict[Entity, list[str]],
        authorization: str | None,
        request_id: str,
        resolution: Resolution,
    ) -> None:
        loop = asyncio.get_running_loop()
        waits: list[tuple[Entity, str, asyncio.Future[_Result]]] = []
        owned: dict[Entity, list[str]] = {e: [] for e in ENTITIES}
        mine: dict[_Key, asyncio.Future[_Result]] = {}
        for entity in ENTITIES:
            for entity_id in misses[entity]:
                key = (entity, instance, entity_id)
                future = self._inflight.get(key)
                if future is None:
                    future = loop.create_future()
                    self._inflight[key] = mine[key] = future
                    owned[entity].append(entity_id)
                waits.append((entity, entity_id, future))
        if mine:
            batches = [
                (entity, ids[start : start + self._batch_size])
                for entity, ids in owned.items()
                for start in range(0, len(ids), self._batch_size)
            ]
            resolution.crm_calls = len(batches)
            task = asyncio.create_task(
                self._fetch_and_store(instance, batches, mine, authorization, request_id)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # asyncio.wait never cancels what it waits for: a cancelled request leaves the
        # shared futures, and the task that fills them, running for everyone else.
        await asyncio.wait([future for _, _, future in waits])
        for entity, entity_id, future in waits:
            result = future.result()
            if isinstance(result, _Failed):
                resolution.complete = False
                resolution.values[entity][entity_id] = None
                resolution.failed_ids.setdefault(entity, []).append(entity_id)
            else:
                resolution.values[entity][entity_id] = result

    async def _fetch_and_store(
        self,
        instance: str,
        batches: list[tuple[Entity, list[str]]],
        futures: dict[_Key, asyncio.Future[_Result]],
        authorization: str | None,
        request_id: str,
    ) -> None:
        to_store: list[tuple[_Key, bytes, int]] = []

        async def fetch(entity: Entity, ids: list[str]) -> None:
            try:
                found = await self._upstream.entities(
                    entity, instance, ids, authorization, request_id
                )
            except CrmError as exc:
                log.warning(
                    "crm.batch_failed",
                    entity=entity,
                    instance=instance,
                    ids=len(ids),
                    error=str(exc),
                    request_id=request_id,
                )
                for entity_id in ids:
                    futures[(entity, instance, entity_id)].set_result(FAILED)
                return
            metrics.CRM_IDS_FETCHED.labels(entity=entity).inc(len(ids))
            for entity_id in ids:
                raw = found.get(entity_id)
                key = (entity, instance, entity_id)
                futures[key].set_result(raw)
                if raw is not None:
                    to_store.append((key, raw, self._ttl))
                elif self._negative_ttl > 0:
                    to_store.append((key, NEGATIVE, self._negative_ttl))

        try:
            await asyncio.gather(*(fetch(entity, ids) for entity, ids in batches))
            # An id invalidated while its lookup was in flight was dropped from
            # `_inflight`: what was fetched may predate the change, so it is not stored.
            await self._cache.write_raw(
                [
                    (self._cache.entity_key(*key), raw, ttl)
                    for key, raw, ttl in to_store
                    if self._inflight.get(key) is futures[key]
                ]
            )
        finally:
            for key, future in futures.items():
                if not future.done():
                    future.set_result(FAILED)
                if self._inflight.get(key) is future:
                    del self._inflight[key]
