"""The WhatsApp and CRM APIs, behind a narrow interface; the only module that knows HTTP clients.

`Upstream` speaks SPEC.md's upstream contract and turns every failure into
one of a few exceptions; the service above it never sees an HTTP library.

It runs on one of two clients, chosen by what it is given:

* `AiohttpClient` (what the service uses, see `app.lifespan.build_http_client`):
  one pooled `aiohttp.ClientSession`. On the benchmark's warm path (a page of
  100 contacts) it serves more requests per CPU second than httpx on either
  of its transports (see bench/README.md).
* an `httpx.AsyncClient`, so tests can mock the upstream with
  `respx.mock(using="httpx")` and tools can pass their own client.

Both behave the same: one deadline for the whole call (headers and body),
no redirects followed, no cookies kept between calls, every transport
failure reported the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import aiohttp
import orjson
import structlog
import yarl

from app import jsonutil, metrics
from app.entities import Entity
from app.errors import BadGateway, GatewayTimeout, UpstreamRejected

if TYPE_CHECKING:
    import httpx  # imported when used: only tests and tools pass an httpx client

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


class _Unreachable(Exception):
    """A transport failure of the httpx client; its args[0] is the original class name."""


# Connection refused or reset, DNS, a malformed answer: the upstream is unreachable.
# (TimeoutError is an OSError too: the callers catch it first, as the deadline.)
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, _Unreachable)


class _Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str


class AiohttpClient:
    """A pooled aiohttp session for both upstreams, created on first use (inside the loop)."""

    def __init__(self, *, max_connections: int, keepalive_seconds: float = 4.0) -> None:
        self._max_connections = max_connections
        # Below the 5 s idle timeout of uvicorn, nginx and most servers, so a pooled
        # connection is not reused just as the server closes it.
        self._keepalive_seconds = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections,
                    limit_per_host=0,
                    keepalive_timeout=self._keepalive_seconds,
                    ttl_dns_cache=60,
                ),
                timeout=aiohttp.ClientTimeout(total=None),  # the deadline is per call, above
                cookie_jar=aiohttp.DummyCookieJar(),  # one caller's cookies are no one else's
                auto_decompress=True,
                raise_for_status=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


HttpClient: TypeAlias = "AiohttpClient | httpx.AsyncClient"


class Upstream:
    """Client of the WhatsApp contacts API and the CRM customers/users API."""

    def __init__(
        self,
        http: HttpClient,
        *,
        whatsapp_url: str,
        crm_url: str,
        crm_token: str | None,
        timeout: float,
    ) -> None:
        self._http = http
        self._get: Callable[[str, dict[str, str]], Awaitable[_Reply]] = (
            self._get_aiohttp if isinstance(http, AiohttpClient) else self._get_httpx
        )
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
                reply = await self._get(url, headers)
            status = reply.status
            if 400 <= status < 500:
                outcome = "rejected"
                raise UpstreamRejected(status, reply.body, reply.content_type)
            if status != 200:
                outcome = f"http_{status // 100}xx"
                raise BadGateway(f"upstream contacts API answered {status}")
            outcome = "bad_body"
            page = _parse_page(reply.body)
            outcome = "ok"
            return page
        except TimeoutError:
            outcome = "timeout"
            raise GatewayTimeout() from None
        except _TRANSPORT_ERRORS as exc:
            outcome = "unreachable"
            log.warning("whatsapp.unreachable", instance=instance, error=_error_name(exc))
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
                reply = await self._get(url, headers)
            if reply.status != 200:
                outcome = f"http_{reply.status // 100}xx"
                raise CrmError(f"CRM answered {reply.status}")
            outcome = "bad_body"
            found = _parse_entities(reply.body)
            outcome = "ok"
            return found
        except TimeoutError:
            outcome = "timeout"
            raise CrmError("CRM timed out") from None
        except _TRANSPORT_ERRORS as exc:
            outcome = "unreachable"
            raise CrmError(f"CRM unreachable: {_error_name(exc)}") from None
        finally:
            metrics.observe_upstream(api, outcome, time.perf_counter() - started)
            metrics.child(metrics.CRM_BATCH_SIZE, entity).observe(len(ids))

    async def _get_aiohttp(self, url: str, headers: dict[str, str]) -> _Reply:
        assert isinstance(self._http, AiohttpClient)
        # encoded=True: the query goes out byte for byte as the caller sent it.
        async with self._http.session().get(
            yarl.URL(_ascii_url(url), encoded=True), headers=headers, allow_redirects=False
        ) as response:
            body = await response.read()
            return _Reply(
                response.status, body, response.headers.get("content-type", "application/json")
            )

    async def _get_httpx(self, url: str, headers: dict[str, str]) -> _Reply:
        import httpx

        assert isinstance(self._http, httpx.AsyncClient)
        try:
            response = await self._http.get(url, headers=headers, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise _Unreachable(type(exc).__name__) from exc
        self._http.cookies.clear()  # like the aiohttp client: no cookie outlives its call
        return _Reply(
            response.status_code,
            response.content,
            response.headers.get("content-type", "application/json"),
        )


def _error_name(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, _Unreachable) else type(exc).__name__


def _headers(authorization: str | None, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id, "accept": "application/json"}
    if authorization:
        headers["authorization"] = authorization
    return headers


# Printable ASCII but space: what may stand in a request target unescaped.
_URL_SAFE = frozenset(range(0x21, 0x7F))


def _ascii_url(url: str) -> str:
    """`url` with any byte outside printable ASCII (of a raw query) percent-encoded."""
    if url.isascii() and url.isprintable() and " " not in url:
        return url
    raw = url.encode("latin-1") if _latin1(url) else url.encode()
    return "".join(chr(b) if b in _URL_SAFE else f"%{b:02X}" for b in raw)


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _parse_page(content: bytes) -> ContactsPage:
    try:
        exotic = jsonutil.is_exotic(content)
        # One scan for long integers, then the matching parser (jsonutil.loads would scan again).
        body = json.loads(content) if exotic else orjson.loads(content)
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
