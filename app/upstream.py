"""The WhatsApp and CRM APIs, behind a narrow interface; the only module that knows HTTP clients.

`Upstream` speaks the upstream contract of docs/api.md and turns every failure into
one of a few exceptions; the service above it never sees an HTTP library.

It runs on one of two clients, chosen by what it is given:

* `Http1Client` (app.http1, what the service uses, see `app.lifespan.build_http_client`):
  pooled keep-alive HTTP/1.1 on httptools, about a third of aiohttp's CPU per
  GET and far less than httpx's (docs/performance.md).
* an `httpx.AsyncClient`, so tests can mock the upstream with
  `respx.mock(using="httpx")` and tools can pass their own client.

Both behave the same: one deadline for the whole call (headers and body,
and the wait for a turn of the instance), no redirects followed, no cookies
kept between calls, every transport failure reported the same way, bodies
read through `app.bodies` (bounded after decompression), header values sent
as the caller's bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import structlog

from app import jsonutil, metrics
from app.bodies import ACCEPT_ENCODING, BadEncoding, BodyTooLarge, BoundedBody
from app.entities import Entity
from app.errors import AppError, BadGateway, GatewayTimeout, UpstreamRejected
from app.http1 import BodySink, Head, Http1Client
from app.instance_limit import PerInstanceLimit

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
_TRANSPORT_ERRORS = (OSError, _Unreachable)


class _Reply(NamedTuple):
    """An answer; `body` is None when it was not read (unwanted, or refused: `refused` says why)."""

    status: int
    body: bytes | bytearray | None
    refused: str | None = None


HttpClient: TypeAlias = "Http1Client | httpx.AsyncClient"


class Upstream:
    """Client of the WhatsApp contacts API and the CRM customers/users API.

    `crm_http` is the CRM's own pool (the contacts API's, `http`, when not
    given), so a contacts API that hangs cannot take the CRM's connections, nor
    the reverse. One instance runs at most `max_calls_per_instance` calls to
    each API at once; more wait for a turn within their deadline.
    """

    def __init__(
        self,
        http: HttpClient,
        *,
        whatsapp_url: str,
        crm_url: str,
        crm_token: str | None,
        timeout: float,
        crm_http: HttpClient | None = None,
        max_body_bytes: int = 32 * 1024 * 1024,
        max_calls_per_instance: int = 100,
    ) -> None:
        self._http = http
        self._crm_http = crm_http or http
        self._whatsapp_url = whatsapp_url.rstrip("/")
        self._crm_url = crm_url.rstrip("/")
        self._crm_auth = f"Bearer {crm_token}" if crm_token else None
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._contacts_turns = PerInstanceLimit(max_calls_per_instance)
        self._crm_turns = PerInstanceLimit(max_calls_per_instance)

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
                await self._contacts_turns.acquire(instance)
                try:
                    reply = await self._get(self._http, url, headers, _contacts_body_wanted)
                finally:
                    self._contacts_turns.release(instance)
            status = reply.status
            if 400 <= status < 500:
                outcome = "rejected"
                raise UpstreamRejected(status, _relayable(status, reply))
            if status != 200:
                outcome = f"http_{status // 100}xx"
                raise BadGateway(f"upstream contacts API answered {status}")
            outcome = "bad_body"
            if reply.body is None:
                log.warning("whatsapp.body_refused", instance=instance, reason=reply.refused)
                raise BadGateway(f"upstream contacts API answered a body {reply.refused}")
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
        except (AppError, UpstreamRejected):
            raise
        except Exception:
            # Whatever the upstream sent, the caller gets a 502, not a 500.
            log.error("whatsapp.unexpected_error", instance=instance, exc_info=True)
            raise BadGateway("upstream contacts API answered what cannot be served") from None
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

        Raises `CrmError` when the call fails in any way, and no other exception.
        """
        url = f"{self._crm_url}/{instance}/{_CRM_PATH[entity]}?ids={','.join(ids)}"
        headers = _headers(self._crm_auth or authorization, request_id)
        api = f"crm_{_CRM_PATH[entity]}"
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self._timeout):
                await self._crm_turns.acquire(instance)
                try:
                    reply = await self._get(self._crm_http, url, headers, _ok_body_wanted)
                finally:
                    self._crm_turns.release(instance)
            if reply.status != 200:
                outcome = f"http_{reply.status // 100}xx"
                raise CrmError(f"CRM answered {reply.status}")
            outcome = "bad_body"
            if reply.body is None:
                raise CrmError(f"CRM answered a body {reply.refused}")
            found = _parse_entities(reply.body)
            outcome = "ok"
            return found
        except CrmError:
            raise
        except TimeoutError:
            outcome = "timeout"
            raise CrmError("CRM timed out") from None
        except _TRANSPORT_ERRORS as exc:
            outcome = "unreachable"
            raise CrmError(f"CRM unreachable: {_error_name(exc)}") from None
        except Exception as exc:
            # Whatever the CRM sent, the batch fails like any other: the caller
            # (app.resolver) releases its leases and logs it.
            raise CrmError(f"CRM answer could not be handled: {type(exc).__name__}") from None
        finally:
            metrics.observe_upstream(api, outcome, time.perf_counter() - started)
            metrics.child(metrics.CRM_BATCH_SIZE, entity).observe(len(ids))

    async def _get(
        self,
        http: HttpClient,
        url: str,
        headers: dict[str, str],
        body_wanted: Callable[[int], bool],
    ) -> _Reply:
        if isinstance(http, Http1Client):
            return await self._get_http1(http, url, headers, body_wanted)
        return await self._get_httpx(http, url, headers, body_wanted)

    async def _get_http1(
        self,
        http: Http1Client,
        url: str,
        headers: dict[str, str],
        body_wanted: Callable[[int], bool],
    ) -> _Reply:
        status = 0
        body: BoundedBody | None = None

        def on_head(head: Head) -> BodySink | None:
            nonlocal status, body
            status = head.status
            if not body_wanted(status):
                return None  # unread: the connection goes, not back to the pool
            body = BoundedBody(self._max_body_bytes, head.headers.get("content-encoding"))
            body.check_length(head.headers.get("content-length"))
            return body.feed

        try:
            await http.get(_ascii_url(url), list(headers.items()), on_head)
            if body is None:
                return _Reply(status, None, "not read")
            return _Reply(status, body.finish())
        except (BodyTooLarge, BadEncoding) as exc:
            return _Reply(status, None, _refusal(exc))

    async def _get_httpx(
        self,
        http: httpx.AsyncClient,
        url: str,
        headers: dict[str, str],
        body_wanted: Callable[[int], bool],
    ) -> _Reply:
        import httpx

        # Header values as the caller's bytes, like the HTTP/1.1 client (httpx would
        # refuse a non-ASCII str).
        raw_headers = {name.encode(): value.encode("latin-1") for name, value in headers.items()}
        try:
            async with http.stream(
                "GET", url, headers=raw_headers, follow_redirects=False
            ) as response:
                if not body_wanted(response.status_code):
                    return _Reply(response.status_code, None, "not read")
                try:
                    if response.is_stream_consumed:
                        # A mock's response (respx) built from bytes: httpx read and decoded
                        # it already, in the test. The bound still holds.
                        body = BoundedBody(self._max_body_bytes, None)
                        body.feed(response.content)
                        return _Reply(response.status_code, body.finish())
                    body = BoundedBody(
                        self._max_body_bytes, response.headers.get("content-encoding")
                    )
                    body.check_length(response.headers.get("content-length"))
                    async for chunk in response.aiter_raw():
                        body.feed(chunk)
                    return _Reply(response.status_code, body.finish())
                except (BodyTooLarge, BadEncoding) as exc:
                    return _Reply(response.status_code, None, _refusal(exc))
        except httpx.HTTPError as exc:
            raise _Unreachable(type(exc).__name__) from exc
        finally:
            http.cookies.clear()  # like the HTTP/1.1 client: no cookie outlives its call


def _contacts_body_wanted(status: int) -> bool:
    return status == 200 or 400 <= status < 500


def _ok_body_wanted(status: int) -> bool:
    return status == 200


def _refusal(exc: Exception) -> str:
    return f"too large ({exc})" if isinstance(exc, BodyTooLarge) else f"badly encoded ({exc})"


def _relayable(status: int, reply: _Reply) -> bytes:
    """The 4xx body for the caller: the upstream's when it is JSON, else `{"detail": ...}`.

    Never an upstream's HTML or text served from this origin.
    """
    if reply.body is not None:
        try:
            jsonutil.parse(reply.body, check_depth=False)
        except ValueError:
            pass
        else:
            return bytes(reply.body)
    return jsonutil.dumps({"detail": f"upstream contacts API answered {status}"})


def _error_name(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, _Unreachable) else type(exc).__name__


def _headers(authorization: str | None, request_id: str) -> dict[str, str]:
    headers = {
        "x-request-id": request_id,
        "accept": "application/json",
        "accept-encoding": ACCEPT_ENCODING,
    }
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


def _parse_page(content: bytes | bytearray) -> ContactsPage:
    try:
        # Nesting is checked when the page is encoded (app.contacts), at no extra cost here.
        body, exotic = jsonutil.parse(content, check_depth=False)
    except jsonutil.InvalidJSON as exc:
        raise BadGateway(
            f"upstream contacts API answered a body that is not strict JSON: {exc}"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise BadGateway("upstream contacts API answered without a data list")
    items = body["data"]
    # (one C pass: the parser makes plain dicts, so a type other than dict is no object)
    if items and set(map(type, items)) != {dict}:
        raise BadGateway("upstream contacts API answered contacts that are not objects")
    return ContactsPage(body=body, items=items, exotic=exotic)


def _parse_entities(content: bytes | bytearray) -> dict[str, bytes]:
    """Each object's compact JSON by its id as a string; objects without a usable id are dropped."""
    try:
        # Nesting is checked as each object is encoded, not by encoding the whole body first.
        body, exact = jsonutil.parse(content, check_depth=False)
    except jsonutil.InvalidJSON as exc:
        raise CrmError(f"CRM answered a body that is not strict JSON: {exc}") from None
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise CrmError("CRM answered without a data list")
    found: dict[str, bytes] = {}
    try:
        for obj in data:
            if isinstance(obj, dict):
                key = obj.get("id")
                if isinstance(key, int | str) and not isinstance(key, bool):
                    found[str(key)] = jsonutil.dumps(obj, exact=exact)
    except jsonutil.InvalidJSON as exc:
        raise CrmError(f"CRM answered an object that cannot be stored: {exc}") from None
    return found
