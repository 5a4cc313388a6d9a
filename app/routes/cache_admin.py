"""`/cache/...`: invalidation for CRM webhooks and per-instance stats, behind `ADMIN_TOKEN`."""

from __future__ import annotations

from typing import Annotated, Literal

import structlog
from fastapi import APIRouter, Path, Response, Security
from fastapi.security import HTTPBearer

from app import metrics
from app.deps import AdminDep, CacheDep, InstancePath, ResolverDep
from app.entities import Entity
from app.errors import AppError
from app.routes.schemas import (
    VALIDATION_FAILED,
    CachedCounts,
    Deleted,
    ErrorDetail,
    InstanceStats,
    Responses,
)

log = structlog.get_logger("app.cache_admin")

# Declares the bearer scheme in the OpenAPI document only (auto_error=False: it never
# answers by itself); require_admin checks the token.
_BEARER = HTTPBearer(auto_error=False, description="`ADMIN_TOKEN`")

router = APIRouter(
    prefix="/cache",
    tags=["cache"],
    dependencies=[AdminDep, Security(_BEARER)],
    responses={
        401: {
            "model": ErrorDetail,
            "description": "Missing or wrong `Authorization: Bearer <ADMIN_TOKEN>`",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        },
        404: {
            "model": ErrorDetail,
            "description": "`ADMIN_TOKEN` is unset: the admin API is off",
        },
        **VALIDATION_FAILED,
    },
)
_UNAVAILABLE: Responses = {
    503: {"model": ErrorDetail, "description": "Redis is down or disabled; nothing was changed"}
}

_ENTITY: dict[str, Entity] = {"customers": "customer", "users": "user"}
IdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="customer or user id")]


class InvalidId(AppError):
    status_code = 422
    detail = "invalid id"


class CacheUnavailable(AppError):
    status_code = 503
    detail = "redis is unavailable or disabled; nothing was changed"


@router.delete(
    "/{instance}/{kind}/{entity_id}",
    status_code=204,
    response_class=Response,
    responses=_UNAVAILABLE,
)
async def invalidate_one(
    instance: InstancePath,
    kind: Literal["customers", "users"],
    entity_id: IdPath,
    cache: CacheDep,
    resolver: ResolverDep,
) -> Response:
    """Drop one cached customer or user; a CRM webhook calls this when the object changes.

    503 when Redis cannot be reached, so a webhook sender retries.
    """
    if entity_id in (".", ".."):
        raise InvalidId()
    entity = _ENTITY[kind]
    deleted = await resolver.invalidate(entity, instance, entity_id)
    if deleted is None:
        raise CacheUnavailable()
    metrics.CACHE_INVALIDATIONS.labels(scope=entity).inc()
    log.info("cache.invalidated", instance=instance, entity=entity, id=entity_id, deleted=deleted)
    return Response(status_code=204)


@router.delete("/{instance}", responses=_UNAVAILABLE)
async def clear_instance(instance: InstancePath, cache: CacheDep, resolver: ResolverDep) -> Deleted:
    """Drop every cached customer and user of one instance (SCAN + UNLINK, never KEYS)."""
    resolver.forget_instance(instance)
    deleted = 0
    for entity in _ENTITY.values():
        count = await cache.clear_matching(cache.entity_match(entity, instance))
        if count is None:
            raise CacheUnavailable()
        deleted += count
    metrics.CACHE_INVALIDATIONS.labels(scope="instance").inc()
    log.info("cache.cleared", instance=instance, deleted=deleted)
    return Deleted(deleted=deleted)


@router.get("/{instance}/stats")
async def instance_stats(
    instance: InstancePath, cache: CacheDep, resolver: ResolverDep
) -> InstanceStats:
    """Keys cached for the instance (shared Redis) and this process's hits and misses for it."""
    counts: dict[str, int | None] = {}
    for kind, entity in _ENTITY.items():
        counts[kind] = await cache.count_matching(cache.entity_match(entity, instance))
    hits, misses = resolver.counts(instance)
    lookups = hits + misses
    return InstanceStats(
        instance=instance,
        redis="disabled"
        if not cache.enabled
        else ("up" if None not in counts.values() else "down"),
        cached=CachedCounts(customers=counts["customers"], users=counts["users"]),
        hits=hits,
        misses=misses,
        hit_ratio=round(hits / lookups, 4) if lookups else None,
        counts_scope="this process since it started",
    )
