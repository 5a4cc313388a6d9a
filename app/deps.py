"""Depends getters for what the lifespan built; tests override them or build their own app."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from app.cache import Cache
from app.config import Settings
from app.errors import NotFound, Unauthorized
from app.resolver import EntityResolver
from app.validation import INSTANCE_PATTERN

# Every dependency here is `async def` on purpose: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per request that cost 13% of a warm request's CPU
# (bench/README.md).


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_cache(request: Request) -> Cache:
    cache: Cache = request.state.cache
    return cache


async def get_resolver(request: Request) -> EntityResolver:
    resolver: EntityResolver = request.state.resolver
    return resolver


async def require_admin(request: Request) -> None:
    """`Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time; 404 when unset.

    Runs before the path is validated, so a caller without the token learns
    nothing about which paths exist or what they accept.
    """
    settings: Settings = request.state.settings
    if settings.admin_token is None:
        raise NotFound()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = settings.admin_token.get_secret_value()
    # Digests of equal length, so neither the content nor the length of the token leaks.
    matches = hmac.compare_digest(_digest(given.strip()), _digest(expected))
    if scheme.lower() != "bearer" or not matches:
        raise Unauthorized()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


SettingsDep = Annotated[Settings, Depends(get_settings)]
CacheDep = Annotated[Cache, Depends(get_cache)]
ResolverDep = Annotated[EntityResolver, Depends(get_resolver)]
AdminDep = Depends(require_admin)
InstancePath = Annotated[str, Path(pattern=INSTANCE_PATTERN, description="instance (tenant) name")]
