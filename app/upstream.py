"""The WhatsApp and CRM APIs, behind a narrow interface; the only module that knows httpx.

`Upstream` speaks SPEC.md's upstream contract and turns every failure into
one of a few exceptions; the service above it never sees an HTTP library.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx
import structlog

from app import jsonutil, metrics
from app.errors import BadGateway, GatewayTimeout, UpstreamRejected

Entity = Literal["customer", "user"]
_CRM_PATH: dict[Entity, str] = {"customer": "customers", "user": "users"}

log = structlog.get_logger("app.upstream")


class CrmError(Exception):
    """One CRM batch failed (5xx, 4xx, timeout, unreachable, bad body); nothing of it is usable."""


@dataclass(frozen=True, slots=True)
class ContactsPage:
    """A parsed 200 answer of the contacts API and whether it needs exact-int JSON handling."""

    body: dict[str, object]
    items: list[dict[str, object]]
    exotic: bool


class Upstream:
    """Client of the WhatsApp contacts API and the CRM customers/users API."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        whatsapp_url: str,
        crm_url: str,
        crm_token: str | None,
        timeout: float,
    ) -> None:
        self._http = http
        self._whatsapp_url = whatsapp_url.rstrip("/")
        self._crm_url = crm_url.rstrip("/")
        self._crm_auth = f"Bearer {crm_token}" if crm_token else None
        self._timeout = timeout

    async def contacts(
        self, instance: str, query: str, authorization: str | None, request_id: str
    ) -> ContactsPage:
        """One page of contacts; raises `UpstreamRejected`, `BadGateway` or `GatewayTimeout`."""
        url = f"{self._whatsapp_url}/{instance}/contacts"
        if query:
            url = f"{url}?{query}"
        headers = _headers(authorization, request_id)
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.get(url, headers=headers)
            status = response.status_code
            if 400 <= status < 500:
                outcome = "rejected"
                raise UpstreamRejected(
                    status,
                    response.content,
                    response.headers.get("content-type", "application/json"),
                )
            if status != 200:
                outcome = f"http_{status // 100}xx"
                raise BadGateway(f"upstream contacts API answered {status}")
            outcome = "bad_body"
            page = _parse_page(response.content)
            outcome = "ok"
            return page
        except TimeoutError:
            outcome = "timeout"
            raise GatewayTimeout() from None
        except httpx.HTTPError as exc:
            outcome = "unreachable"
            log.warning("whatsapp.unreachable", instance=instance, error=type(exc).__name__)
            raise BadGateway("upstream contacts API unreachable") from None
        finally:
            metrics.observe_upstream("whatsapp", outcome, time.perf_counter() - started)

    async def entities(
        self,
        entity: Entity,
        instance: str,
        ids: Sequence[str],
        authorization: str | None,
        request_id: str,
    ) -> dict[str, bytes]:
        """The CRM objects of `ids` that exist, as compact JSON keyed by their id; one call.

        Raises `CrmError` when the call fails in any way.
        """
        url = f"{self._crm_url}/{instance}/{_CRM_PATH[entity]}?ids={','.join(ids)}"
        headers = _headers(self._crm_auth or authorization, request_id)
        api = f"crm_{_CRM_PATH[entity]}"
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.get(url, headers=headers)
            if response.status_code != 200:
                outcome = f"http_{response.status_code // 100}xx"
                raise CrmError(f"CRM answered {response.status_code}")
            outcome = "bad_body"
            found = _parse_entities(response.content)
            outcome = "ok"
            return found
        except TimeoutError:
            outcome = "timeout"
            raise CrmError("CRM timed out") from None
        except httpx.HTTPError as exc:
            outcome = "unreachable"
            raise CrmError(f"CRM unreachable: {type(exc).__name__}") from None
        finally:
            metrics.observe_upstream(api, outcome, time.perf_counter() - started)
            metrics.CRM_BATCH_SIZE.labels(entity=entity).observe(len(ids))


def _headers(authorization: str | None, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id, "accept": "application/json"}
    if authorization:
        headers["authorization"] = authorization
    return headers


def _parse_page(content: bytes) -> ContactsPage:
    try:
        exotic = jsonutil.is_exotic(content)
        body = jsonutil.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise BadGateway("upstream contacts API answered a body that is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise BadGateway("upstream contacts API answered without a data list")
    items = body["data"]
    if not all(isinstance(item, dict) for item in items):
        raise BadGateway("upstream contacts API answered contacts that are not objects")
    return ContactsPage(body=body, items=items, exotic=exotic)


def _parse_entities(content: bytes) -> dict[str, bytes]:
    """Each object's compact JSON by its id as a string; objects without a usable id are dropped."""
    try:
        body = jsonutil.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise CrmError("CRM answered a body that is not JSON") from None
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise CrmError("CRM answered without a data list")
    found: dict[str, bytes] = {}
    for obj in data:
        if isinstance(obj, dict):
            key = obj.get("id")
            if isinstance(key, int | str) and not isinstance(key, bool):
                found[str(key)] = jsonutil.dumps(obj)
    return found
