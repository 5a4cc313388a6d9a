"""SPEC.md "Hostile upstreams and limits": a buggy or malicious upstream never takes the service
down, never poisons the cache, never makes it serve anything but strict JSON.

The upstream here is `tests.support.hostile`, a raw HTTP server that sends
what a real framework would not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.upstream import AiohttpClient, CrmError, Upstream
from tests.conftest import Service, StartService
from tests.support import hostile
from tests.support.hostile import HostileUpstream
from tests.support.procs import RedisServer

MIB = 1024 * 1024
BOUND = MIB  # UPSTREAM_MAX_BODY_BYTES of the in-process services below


@pytest.fixture
async def upstream_server() -> AsyncIterator[HostileUpstream]:
    server = await HostileUpstream().start()
    yield server
    await server.stop()


async def service_on(start_service: StartService, server: HostileUpstream, **kw: Any) -> Service:
    return await start_service(
        whatsapp_api_url=server.url,
        crm_api_url=server.url,
        upstream_max_body_bytes=BOUND,
        upstream_timeout_seconds=kw.pop("upstream_timeout_seconds", 5),
        **kw,
    )


def cached_keys(redis_server: RedisServer, pattern: str) -> list[bytes]:
    return list(redis_server.client().scan_iter(match=pattern))


OVERSIZED = {
    "announced-8MiB": lambda status=200: hostile.huge(8 * MIB, status),
    "endless-chunked": lambda status=200: hostile.endless(status),
    "gzip-bomb-64MiB": lambda status=200: hostile.gzip_bomb(64 * MIB, status),
}


class TestBoundedBodies:
    @pytest.mark.parametrize("answer", OVERSIZED.values(), ids=OVERSIZED.keys())
    async def test_a_contacts_body_past_the_bound_is_502_at_once(
        self, start_service: StartService, upstream_server: HostileUpstream, answer: Any
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["contacts"] = answer()
        started = time.monotonic()
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 502
        assert "too large" in response.json()["detail"]
        assert time.monotonic() - started < 4, "abandoned at the bound, not read to the deadline"
        assert upstream_server.requests_to("customers") == [], "nothing of it was used"

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    async def test_a_compressed_body_within_the_bound_is_served(
        self, start_service: StartService, upstream_server: HostileUpstream, encoding: str
    ) -> None:
        service = await service_on(start_service, upstream_server)
        page = b'{"data": [{"customerId": 1, "userId": 1, "pad": "' + b"x" * (BOUND // 2) + b'"}]}'
        upstream_server.answers["contacts"] = hostile.compressed(page, encoding)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 200
        assert response.json()["data"][0]["customer"] == {"id": 1, "name": "one"}
        assert b"gzip, deflate" in (upstream_server.requests[0].header(b"accept-encoding") or b"")

    @pytest.mark.parametrize("answer", OVERSIZED.values(), ids=OVERSIZED.keys())
    async def test_a_4xx_body_past_the_bound_keeps_its_status_with_a_detail(
        self, start_service: StartService, upstream_server: HostileUpstream, answer: Any
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["contacts"] = answer(403)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 403
        assert response.json() == {"detail": "upstream contacts API answered 403"}

    @pytest.mark.parametrize("answer", OVERSIZED.values(), ids=OVERSIZED.keys())
    async def test_a_crm_answer_past_the_bound_is_a_failed_batch_never_cached(
        self,
        start_service: StartService,
        upstream_server: HostileUpstream,
        redis_server: RedisServer,
        answer: Any,
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["customers"] = answer()
        response = await service.get("/contacts?instance=acme")
        await service.settle()

        assert response.status_code == 200
        assert response.headers["x-enrichment"] == "partial"
        assert response.json()["data"][0]["customer"] is None
        assert response.json()["data"][0]["user"] == {"id": 1, "name": "one"}
        assert cached_keys(redis_server, "*customer:*") == []
        assert cached_keys(redis_server, "*user:*") != []


def _clients() -> dict[str, Any]:
    return {"aiohttp": lambda: AiohttpClient(max_connections=10), "httpx": httpx.AsyncClient}


@pytest.fixture(params=["aiohttp", "httpx"])
async def both_clients(
    request: pytest.FixtureRequest, upstream_server: HostileUpstream
) -> AsyncIterator[Upstream]:
    """`Upstream` on each HTTP client it runs on, against the hostile server."""
    http = _clients()[request.param]()
    yield Upstream(
        http,
        whatsapp_url=upstream_server.url,
        crm_url=upstream_server.url,
        crm_token=None,
        timeout=5,
        max_body_bytes=BOUND,
    )
    await http.aclose()


class TestBothClientsBehaveTheSame:
    @pytest.mark.parametrize("answer", OVERSIZED.values(), ids=OVERSIZED.keys())
    async def test_refuse_a_contacts_body_past_the_bound(
        self, both_clients: Upstream, upstream_server: HostileUpstream, answer: Any
    ) -> None:
        from app.errors import BadGateway

        upstream_server.answers["contacts"] = answer()
        with pytest.raises(BadGateway, match="too large"):
            await both_clients.contacts("acme", "", None, "r")

    @pytest.mark.parametrize("answer", OVERSIZED.values(), ids=OVERSIZED.keys())
    async def test_refuse_a_crm_body_past_the_bound(
        self, both_clients: Upstream, upstream_server: HostileUpstream, answer: Any
    ) -> None:
        upstream_server.answers["users"] = answer()
        with pytest.raises(CrmError, match="too large"):
            await both_clients.entities("user", "acme", ["1"], None, "r")

    async def test_read_a_gzip_body_within_the_bound(
        self, both_clients: Upstream, upstream_server: HostileUpstream
    ) -> None:
        upstream_server.answers["users"] = hostile.compressed(b'{"data": [{"id": 7}]}', "gzip")

        assert await both_clients.entities("user", "acme", ["7"], None, "r") == {"7": b'{"id":7}'}

    @pytest.mark.parametrize(
        "answer",
        [
            hostile.body(b"\x1f\x8b not really gzip", content_type="application/json"),
            hostile.stream(lambda: _one(b"\x1f\x8b\x08\x00\x00\x00"), encoding="gzip"),
            hostile.stream(lambda: _one(b'{"data": []}'), encoding="br"),
        ],
        ids=["gzip-magic-unannounced", "truncated-gzip", "unasked-brotli"],
    )
    async def test_refuse_what_is_badly_encoded(
        self, both_clients: Upstream, upstream_server: HostileUpstream, answer: Any
    ) -> None:
        upstream_server.answers["users"] = answer
        with pytest.raises(CrmError):
            await both_clients.entities("user", "acme", ["1"], None, "r")


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


class TestMemoryStaysBounded:
    """A real service process (the default 32 MiB bound) fed what once took gigabytes."""

    @pytest.mark.parametrize(
        ("route", "answer"),
        [
            ("contacts", lambda: hostile.huge(200 * MIB)),
            ("contacts", lambda: hostile.endless()),  # abandoned long before 1 GiB
            ("contacts", lambda: hostile.gzip_bomb(1024 * MIB)),  # ~1 MB on the wire
            ("customers", lambda: hostile.gzip_bomb(1024 * MIB)),
        ],
        ids=["200MB-body", "endless-stream", "1GiB-gzip-bomb", "1GiB-gzip-bomb-from-the-crm"],
    )
    async def test_peak_rss_grows_by_tens_of_mb_at_most(
        self, upstream_server: HostileUpstream, route: str, answer: Any
    ) -> None:
        from tests.support.replicas import ServiceProcess

        service = ServiceProcess(
            {
                "WHATSAPP_API_URL": upstream_server.url,
                "CRM_API_URL": upstream_server.url,
                "USE_REDIS": "false",
                "LOG_LEVEL": "warning",
            }
        )
        await asyncio.to_thread(service.start)
        try:
            async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
                warm = await client.get("/contacts?instance=acme")
                assert warm.status_code == 200
                before = peak_rss(service.pid)
                upstream_server.answers[route] = answer()
                response = await client.get("/contacts?instance=acme")
                grown = peak_rss(service.pid) - before
        finally:
            service.stop()

        assert response.status_code == (502 if route == "contacts" else 200)
        print(f"peak RSS growth: {grown / MIB:.1f} MiB")
        assert grown < 80 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB"


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


BIG = b"123456789012345678901234567890"  # beyond 64 bits: the standard library's path
NOT_STRICT = {
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e999": b"1e999",
    "lone-surrogate": b'"\\ud800"',
    "lone-low-surrogate": b'"a\\udc00b"',
    "raw-surrogate-bytes": b'"\xed\xa0\x80"',
    "invalid-utf8": b'"\xff"',
    "300-levels": nested(300),
    "100000-levels": nested(100_000),
}
BOM = b"\xef\xbb\xbf"


def contacts_page(value: bytes, *, exact: bool) -> bytes:
    big = b', "big": ' + BIG if exact else b""
    return b'{"data": [{"customerId": 1, "userId": 1, "x": ' + value + big + b"}]}"


def crm_answer(value: bytes, *, exact: bool) -> bytes:
    big = b', "big": ' + BIG if exact else b""
    return b'{"data": [{"id": 1, "x": ' + value + big + b"}]}"


BOTH_PATHS = pytest.mark.parametrize("exact", [False, True], ids=["orjson-path", "exact-path"])


class TestStrictJson:
    @BOTH_PATHS
    @pytest.mark.parametrize("value", NOT_STRICT.values(), ids=NOT_STRICT.keys())
    async def test_contacts_content_that_is_not_strict_json_is_502(
        self,
        start_service: StartService,
        upstream_server: HostileUpstream,
        value: bytes,
        exact: bool,
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["contacts"] = hostile.body(contacts_page(value, exact=exact))
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"]

    @BOTH_PATHS
    async def test_a_byte_order_mark_gets_the_same_answer_on_both_paths(
        self, start_service: StartService, upstream_server: HostileUpstream, exact: bool
    ) -> None:
        service = await service_on(start_service, upstream_server)
        page = BOM + contacts_page(b"1", exact=exact)
        upstream_server.answers["contacts"] = hostile.body(page)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 502  # RFC 8259 lets a parser refuse it; both do

    @BOTH_PATHS
    @pytest.mark.parametrize(
        "value", [*NOT_STRICT.values(), BOM], ids=[*NOT_STRICT.keys(), "byte-order-mark"]
    )
    async def test_crm_content_that_is_not_strict_json_is_a_failed_batch_never_cached(
        self,
        start_service: StartService,
        upstream_server: HostileUpstream,
        redis_server: RedisServer,
        value: bytes,
        exact: bool,
    ) -> None:
        service = await service_on(start_service, upstream_server)
        answer = (
            BOM + crm_answer(b"1", exact=exact) if value == BOM else crm_answer(value, exact=exact)
        )
        upstream_server.answers["customers"] = hostile.body(answer)
        response = await service.get("/contacts?instance=acme")
        await service.settle()
        again = await service.get("/contacts?instance=acme")

        for served in (response, again):
            assert served.status_code == 200
            assert served.headers["x-enrichment"] == "partial"
            assert served.json()["data"][0]["customer"] is None
            assert served.json()["data"][0]["user"] == {"id": 1, "name": "one"}
        assert cached_keys(redis_server, "*customer:*") == []
        assert len(upstream_server.requests_to("customers")) == 2, "asked again: nothing cached"

    async def test_integers_beyond_64_bits_pass_through_exactly(
        self, start_service: StartService, upstream_server: HostileUpstream
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["contacts"] = hostile.body(contacts_page(b"-" + BIG, exact=True))
        upstream_server.answers["customers"] = hostile.body(crm_answer(BIG, exact=True))
        first = await service.get("/contacts?instance=acme")
        await service.settle()
        warm = await service.get("/contacts?instance=acme")

        for response in (first, warm):
            assert response.status_code == 200
            item = response.content
            assert b'"x":-' + BIG + b',"big":' + BIG in item
            assert b'"customer":{"id":1,"x":' + BIG + b',"big":' + BIG + b"}" in item

    async def test_deep_but_encodable_nesting_is_served(
        self, start_service: StartService, upstream_server: HostileUpstream
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["contacts"] = hostile.body(contacts_page(nested(200), exact=False))
        upstream_server.answers["customers"] = hostile.body(crm_answer(nested(200), exact=True))
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 200
        assert response.headers["x-enrichment"] == "complete"
        assert response.json()["data"][0]["customer"]["x"] == response.json()["data"][0]["x"]
