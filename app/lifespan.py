"""Builds the process's shared resources at start-up and closes them at shutdown."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

import structlog
from fastapi import FastAPI

from app.admission import Admission
from app.breaker import CircuitBreaker
from app.cache import Cache
from app.config import Settings
from app.contacts import ContactsService
from app.http1 import Http1Client
from app.redis_client import build_redis, warm_up
from app.resolver import CachePolicy, EntityResolver
from app.upstream import Upstream

log = structlog.get_logger("app.lifespan")

_DRAIN_SECONDS = 5.0


class State(TypedDict):
    settings: Settings
    cache: Cache
    resolver: EntityResolver
    admission: Admission
    contacts: ContactsService


def build_http_client(settings: Settings) -> Http1Client:
    """One pooled client for one upstream API (app.http1).

    The contacts API and the CRM get one each: a pool of their own, so one that
    hangs cannot take the other's connections.
    """
    return Http1Client(max_connections=settings.upstream_max_connections)


def scope_key(settings: Settings) -> bytes:
    """The key of the hash that scopes cached entries to the caller's credential when the
    CRM is read with it (no `CRM_API_TOKEN`): `CACHE_SCOPE_SECRET`, or else one derived from
    the Redis URL and key prefix, which every replica sharing the cache has too."""
    if settings.cache_scope_secret is not None:
        return settings.cache_scope_secret.get_secret_value().encode()
    shared = f"enriched-contacts scope\n{settings.redis_url}\n{settings.cache_key_prefix}"
    return hashlib.sha256(shared.encode()).digest()


def lifespan_for(settings: Settings) -> object:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        http = build_http_client(settings)
        crm_http = build_http_client(settings)
        client = build_redis(settings) if settings.use_redis else None
        if client is not None:
            warm_up(client)
        cache = Cache(
            client,
            timeout=settings.redis_timeout_seconds,
            prefix=settings.cache_key_prefix,
            breaker=CircuitBreaker(
                settings.redis_breaker_failures, settings.redis_breaker_cooldown_seconds
            ),
        )
        upstream = Upstream(
            http,
            whatsapp_url=settings.whatsapp_api_url,
            crm_url=settings.crm_api_url,
            crm_token=settings.crm_api_token.get_secret_value() if settings.crm_api_token else None,
            timeout=settings.upstream_timeout_seconds,
            crm_http=crm_http,
            max_body_bytes=settings.upstream_max_body_bytes,
            max_calls_per_instance=settings.upstream_max_calls_per_instance,
        )
        resolver = EntityResolver(
            cache,
            upstream,
            batch_size=settings.upstream_batch_size,
            policy=CachePolicy(
                ttl=settings.cache_ttl_seconds,
                negative_ttl=settings.cache_negative_ttl_seconds,
                stale=settings.cache_stale_seconds,
                refresh_ahead=settings.cache_refresh_ahead_seconds,
                lease_wait=settings.cache_lease_wait_seconds,
                lease_ttl=settings.upstream_timeout_seconds,
                max_value_bytes=settings.cache_max_value_bytes,
            ),
            scope_key=None if settings.crm_api_token else scope_key(settings),
        )
        log.info(
            "service.start",
            redis="off" if client is None else settings.redis_mode,
            whatsapp_api_url=settings.whatsapp_api_url,
            crm_api_url=settings.crm_api_url,
        )
        admission = Admission(
            settings.max_active_requests, settings.admission_queue_timeout_seconds
        )
        state = State(
            settings=settings,
            cache=cache,
            resolver=resolver,
            admission=admission,
            contacts=ContactsService(upstream, resolver, admission),
        )
        app.state.resources = state  # for tools and tests that hold the app, not a request
        try:
            yield state
        finally:
            await resolver.drain(_DRAIN_SECONDS)
            await http.aclose()
            await crm_http.aclose()
            await cache.close()
            log.info("service.stop")

    return lifespan
