"""The WhatsApp and CRM APIs, behind a narrow interface; the only module that knows HTTP clients.

`Upstream` speaks the upstream contract of docs/api.md and turns every failure into
one of a few exceptions; the service above it never sees an HTTP library.

It runs on one of two clients, chosen by what it is given:

* `AiohttpClient` (what the service uses, see `app.lifespan.build_http_client`):
  one pooled `aiohttp.ClientSession`. On the benchmark's warm path (a page of
  100 contacts) it serves more requests per CPU second than httpx on either
  of its transports (see bench/README.md).
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

import aiohttp
import structlog
import yarl

from app import jsonutil, metrics
from app.bodies import ACCEPT_ENCODING, BadEncoding, BodyTooLarge, BoundedBody
from app.entities import Entity
from app.errors import AppError, BadGateway, GatewayTimeout, UpstreamRejected
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
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, _Unreachable)


class _Reply(NamedTuple):
    """An answer; `body` is None when it was not read (unwanted, or refused: `refused` says why)."""

    status: int
    body: bytes | bytearray | None
    refused: str | None = None


class _Latin1HeadersRequest(aiohttp.ClientRequest):
    """Sends header values as their latin-1 bytes, so a caller's bytes reach the upstream as sent.

    Header values arrive decoded as latin-1 (one character per byte, as ASGI
    gives them) and aiohttp writes headers as UTF-8, which turns a caller's
    `caf\\xe9` into `caf\\xc3\\xa9`. For the rare request with such a value, the
    header block aiohttp writes is mapped back to one byte per character on its
    way to the socket (a bodiless GET writes nothing else from `send`).
    """

    async def send(self, conn: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        protocol = conn.protocol
        # Only Authorization can carry such bytes: every other header is ours, and ASCII.
        if protocol is None or self.headers.get("authorization", "").isascii():
            return await super().send(conn)
        transport = protocol.transport
        protocol.transport = _Latin1Writes(transport)  # type: ignore[assignment]
        try:
            return await super().send(conn)
        finally:
            protocol.transport = transport


class _Latin1Writes:
    """A transport whose `write` re-encodes UTF-8 text as latin-1; everything else is the same."""

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(bytes(data).decode().encode("latin-1"))

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class AiohttpClient:
    """A pooled aiohttp session (one per upstream API), created on first use (inside the loop)."""

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
                auto_decompress=False,  # app.bodies inflates, within bounds
                raise_for_status=False,
                request_class=_Latin1HeadersRequest,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


HttpClient: TypeAlias = "AiohttpClient | httpx.AsyncClient"


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
        if isinstance(http, AiohttpClient):
            return await self._get_aiohttp(http, url, headers, body_wanted)
        return await self._get_httpx(http, url, headers, body_wanted)

    async def _get_aiohttp(
        self,
        http: AiohttpClient,
        url: str,
        headers: dict[str, str],
        body_wanted: Callable[[int], bool],
    ) -> _Reply:
        # encoded=True: the query goes out byte for byte as the caller sent it.
        async with http.session().get(
            yarl.URL(_ascii_url(url), encoded=True), headers=headers, allow_redirects=False
        ) as response:
            if not body_wanted(response.status):
                response.close()  # unread: the connection goes, not back to the pool
                return _Reply(response.status, None, "not read")
            try:
                body = BoundedBody(self._max_body_bytes, response.headers.get("content-encoding"))
                body.check_length(response.headers.get("content-length"))
                while chunk := await response.content.readany():
                    body.feed(chunk)
                return _Reply(response.status, body.finish())
            except (BodyTooLarge, BadEncoding) as exc:
                response.close()
                return _Reply(response.status, None, _refusal(exc))

    async def _get_httpx(
        self,
        http: httpx.AsyncClient,
        url: str,
        headers: dict[str, str],
        body_wanted: Callable[[int], bool],
    ) -> _Reply:
        import httpx

        # Header values as the caller's bytes, like the aiohttp client (httpx would
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
            http.cookies.clear()  # like the aiohttp client: no cookie outlives its call


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
    if not all(isinstance(item, dict) for item in items):
        raise BadGateway("upstream contacts API answered contacts that are not objects")
    return ContactsPage(body=body, items=items, exotic=exotic)


def _parse_entities(content: bytes | bytearray) -> dict[str, bytes]:
    """Each object's compact JSON by its id as a string; objects without a usable id are dropped."""
    try:
        body = jsonutil.loads(content)
    except jsonutil.InvalidJSON as exc:
        raise CrmError(f"CRM answered a body that is not strict JSON: {exc}") from None
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
