"""Depends getters for what the lifespan built; tests override them or build their own app."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from app.cache import Cache
from app.config import Settings
from app.contacts import ContactsService
from app.errors import NotFound, Unauthorized
from app.resolver import EntityResolver
from app.validation import INSTANCE_PATTERN


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def get_cache(request: Request) -> Cache:
    cache: Cache = request.state.cache
    return cache


def get_resolver(request: Request) -> EntityResolver:
    resolver: EntityResolver = request.state.resolver
    return resolver


def get_contacts_service(request: Request) -> ContactsService:
    service: ContactsService = request.state.contacts
    return service


def require_admin(request: Request) -> None:
    """`Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time; 404 when unset."""
    settings: Settings = request.state.settings
    if settings.admin_token is None:
        raise NotFound()
    expected = f"Bearer {settings.admin_token.get_secret_value()}".encode()
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, expected):
        raise Unauthorized()


SettingsDep = Annotated[Settings, Depends(get_settings)]
CacheDep = Annotated[Cache, Depends(get_cache)]
ResolverDep = Annotated[EntityResolver, Depends(get_resolver)]
ContactsServiceDep = Annotated[ContactsService, Depends(get_contacts_service)]
AdminDep = Depends(require_admin)
InstancePath = Annotated[str, Path(pattern=INSTANCE_PATTERN, description="instance (tenant) name")]
