"""docs/limits.md: a buggy or malicious upstream never takes the service
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

from app.http1 import Http1Client
from app.upstream import CrmError, Upstream
from tests.conftest import Service, StartService
from tests.support import hostile
from tests.support.hostile import HostileUpstream
from tests.support.procs import RedisServer, eventually, memory_bytes

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
    return {"http1": lambda: Http1Client(max_connections=10), "httpx": httpx.AsyncClient}


@pytest.fixture(params=["http1", "httpx"])
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
                before = memory_bytes(service.pid, "VmHWM")
                upstream_server.answers[route] = answer()
                response = await client.get("/contacts?instance=acme")
                grown = memory_bytes(service.pid, "VmHWM") - before
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


CRASHED_PARSING = {
    "100000-levels-exact": b'{"data": [{"id": 1, "big": '
    + BIG
    + b', "x": '
    + nested(100_000)
    + b"}]}",
    "lone-surrogate-exact": b'{"data": [{"id": 1, "big": ' + BIG + b', "x": "\\ud800"}]}',
    "300-levels": b'{"data": [{"id": 1, "x": ' + nested(300) + b"}]}",
    "data-not-a-list": b'{"data": {"id": 1}}',
    "not-an-object": b"[1, 2]",
    "truncated": b'{"data": [{"id": 1',
}


class TestCrmFailuresAreOnlyCrmErrors:
    @pytest.mark.parametrize("content", CRASHED_PARSING.values(), ids=CRASHED_PARSING.keys())
    async def test_any_unusable_answer_leaves_entities_as_crm_error(
        self, both_clients: Upstream, upstream_server: HostileUpstream, content: bytes
    ) -> None:
        upstream_server.answers["users"] = hostile.body(content)
        with pytest.raises(CrmError):
            await both_clients.entities("user", "acme", ["1"], None, "r")

    async def test_the_failed_batch_is_logged_with_the_request_id_and_retried_next_time(
        self,
        start_service: StartService,
        upstream_server: HostileUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["customers"] = hostile.body(CRASHED_PARSING["100000-levels-exact"])
        first = await service.get("/contacts?instance=acme", headers={"x-request-id": "req-8"})
        await service.settle()
        del upstream_server.answers["customers"]
        second = await service.get("/contacts?instance=acme")

        assert first.headers["x-enrichment"] == "partial"
        failed = [r.msg for r in caplog.records if "crm.batch_failed" in str(r.msg)]
        assert failed
        assert all("req-8" in str(msg) for msg in failed), failed
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        assert second.headers["x-enrichment"] == "complete"
        assert second.json()["data"][0]["customer"] == {"id": 1, "name": "one"}


async def raw_get(url: str, target: str, *headers: bytes) -> bytes:
    """One HTTP/1.1 GET written byte for byte on a socket; the whole answer as received."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"GET {target} HTTP/1.1".encode(), f"Host: {host}".encode(), *headers]
        writer.write(b"\r\n".join([*lines, b"Connection: close", b"", b""]))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


class TestAuthorizationBytes:
    async def test_reach_both_upstreams_as_the_caller_sent_them(
        self, start_service: StartService, upstream_server: HostileUpstream
    ) -> None:
        # the caller-credential mode, where the caller's header also goes to the CRM
        service = await service_on(start_service, upstream_server, crm_api_token=None)
        answer = await raw_get(
            service.url, "/contacts?instance=acme", b"Authorization: Bearer caf\xe9 \x80\xff!"
        )

        assert answer.startswith(b"HTTP/1.1 200")
        for route in ("contacts", "customers", "users"):
            [request] = upstream_server.requests_to(route)
            assert request.header(b"authorization") == b"Bearer caf\xe9 \x80\xff!", route

    async def test_utf8_bytes_are_not_encoded_twice(
        self, start_service: StartService, upstream_server: HostileUpstream
    ) -> None:
        service = await service_on(start_service, upstream_server)
        await raw_get(service.url, "/contacts?instance=acme", "Authorization: café ✓".encode())

        [request] = upstream_server.requests_to("contacts")
        assert request.header(b"authorization") == "café ✓".encode()

    async def test_both_clients_send_the_same_bytes(
        self, both_clients: Upstream, upstream_server: HostileUpstream
    ) -> None:
        await both_clients.contacts("acme", "", "Bearer caf\xe9", "r")
        await both_clients.entities("user", "acme", ["1"], "Bearer caf\xe9", "r")

        for route in ("contacts", "users"):
            [request] = upstream_server.requests_to(route)
            assert request.header(b"authorization") == b"Bearer caf\xe9"


class TestUpstreamErrorBodies:
    @pytest.mark.parametrize(
        ("content", "content_type"),
        [
            (b"<html><script>alert(document.cookie)</script></html>", "text/html"),
            (b"<script>alert(1)</script>", "application/json"),  # a lying content type
            (b"Forbidden", "text/plain"),
            (b"", "application/json"),
            (b'{"error": NaN}', "application/json"),
        ],
        ids=["html", "html-labelled-json", "text", "empty", "not-strict-json"],
    )
    async def test_a_4xx_that_is_not_json_becomes_a_json_detail_with_its_status(
        self,
        start_service: StartService,
        upstream_server: HostileUpstream,
        content: bytes,
        content_type: str,
    ) -> None:
        service = await service_on(start_service, upstream_server)
        upstream_server.answers["contacts"] = hostile.body(content, 400, content_type)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json() == {"detail": "upstream contacts API answered 400"}

    @pytest.mark.parametrize("content_type", ["application/json", "text/plain", "text/html"])
    async def test_a_json_4xx_is_relayed_unchanged_as_json(
        self,
        start_service: StartService,
        upstream_server: HostileUpstream,
        content_type: str,
    ) -> None:
        service = await service_on(start_service, upstream_server)
        content = b'{"error": "quota", "id": ' + BIG + b"}"
        upstream_server.answers["contacts"] = hostile.body(content, 429, content_type)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 429
        assert response.headers["content-type"] == "application/json"
        assert response.content == content

    @pytest.mark.parametrize(
        ("path", "status"),
        [
            ("/contacts?instance=acme", 200),
            ("/contacts?instance=BAD", 422),
            ("/health", 200),
            ("/metrics", 200),
            ("/nowhere", 404),
            ("/cache/acme/stats", 404),
        ],
    )
    async def test_every_response_says_nosniff(
        self, start_service: StartService, upstream_server: HostileUpstream, path: str, status: int
    ) -> None:
        service = await service_on(start_service, upstream_server)
        response = await service.get(path)

        assert response.status_code == status
        assert response.headers["x-content-type-options"] == "nosniff"

    async def test_even_an_internal_error_says_nosniff(self) -> None:
        from app.middleware import RequestContextMiddleware

        async def broken(scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("bug")

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""}
        await RequestContextMiddleware(broken)(scope, None, send)  # type: ignore[arg-type]

        assert sent[0]["status"] == 500
        assert (b"x-content-type-options", b"nosniff") in sent[0]["headers"]


def stuck_contacts(stuck_instance: str) -> hostile.Answer:
    """The contacts API: hangs for one instance, answers the others at once."""
    hang, healthy = hostile.hang(), hostile.body(b'{"data": [{"customerId": 1, "userId": 1}]}')

    async def answer(request: hostile.RawRequest, writer: asyncio.StreamWriter) -> None:
        await (hang if f"/{stuck_instance}/" in request.path else healthy)(request, writer)

    return answer


class TestOneHangingTenant:
    async def test_does_not_delay_a_healthy_tenant(
        self, start_service: StartService, upstream_server: HostileUpstream
    ) -> None:
        # The defaults: 200 connections per pool, at most 100 calls per instance.
        service = await service_on(start_service, upstream_server, upstream_timeout_seconds=8)
        upstream_server.answers["contacts"] = stuck_contacts("stuck")
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
            hammering = [
                asyncio.create_task(client.get("/contacts?instance=stuck")) for _ in range(250)
            ]
            try:
                await eventually(
                    lambda: upstream_server.open_connections >= 100, 20, message="100 calls held"
                )
                started = time.monotonic()
                healthy = await client.get("/contacts?instance=healthy")
                elapsed = time.monotonic() - started
                held = upstream_server.open_connections
            finally:
                stuck = await asyncio.gather(*hammering)

        assert healthy.status_code == 200
        assert healthy.json()["data"][0]["customer"] == {"id": 1, "name": "one"}
        print(f"healthy tenant served in {elapsed * 1000:.0f} ms beside 250 hanging calls")
        assert elapsed < 2, f"the healthy tenant waited {elapsed:.1f} s"
        assert held <= 100, "one instance holds at most its share of the pool"
        assert {r.status_code for r in stuck} == {504}
        turns = service.resources["contacts"]._upstream._contacts_turns
        assert turns.tracked() == 0, "no bookkeeping is left for an idle instance"

    async def test_waiting_for_a_turn_counts_against_the_deadline(
        self, start_service: StartService, upstream_server: HostileUpstream
    ) -> None:
        service = await service_on(
            start_service,
            upstream_server,
            upstream_timeout_seconds=2,
            upstream_max_calls_per_instance=1,
        )
        upstream_server.answers["contacts"] = stuck_contacts("stuck")
        started = time.monotonic()
        first, second = await asyncio.gather(
            service.get("/contacts?instance=stuck"), service.get("/contacts?instance=stuck")
        )
        elapsed = time.monotonic() - started

        assert (first.status_code, second.status_code) == (504, 504)
        assert len(upstream_server.requests_to("contacts")) == 1, "the second never got a turn"
        # Had the wait for the turn not counted, the second would have taken 4 s.
        assert elapsed < 3.5, "one deadline, not the turn's wait plus a deadline"


class TestPerInstanceLimit:
    async def test_keeps_no_entry_for_an_instance_nobody_uses(self) -> None:
        from app.instance_limit import PerInstanceLimit

        limit = PerInstanceLimit(1)
        for i in range(10_000):
            await limit.acquire(f"tenant-{i}")
            limit.release(f"tenant-{i}")
        await limit.acquire("a")
        waiter = asyncio.create_task(limit.acquire("a"))
        await asyncio.sleep(0.01)
        assert not waiter.done(), "a second call of the same instance waits"
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        limit.release("a")

        assert limit.tracked() == 0


class TestBoundedBodyDecoding:
    """app.bodies on its own: what servers really send is inflated, and never past the limit."""

    CONTENT = b'{"data": [' + b'{"id": 1, "pad": "abc"},' * 5000 + b"{}]}"

    @pytest.mark.parametrize(
        ("encoding", "wbits"),
        [("gzip", 31), ("x-gzip", 31), ("deflate", 15), ("deflate", -15)],
        ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw"],
    )
    def test_inflates_what_servers_send_in_any_chunking(self, encoding: str, wbits: int) -> None:
        import zlib

        from app.bodies import BoundedBody

        packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
        data = packer.compress(self.CONTENT) + packer.flush()
        for first in (1, 2, 7, 4096, len(data)):
            body = BoundedBody(len(self.CONTENT), encoding)
            body.feed(data[:first])
            for start in range(first, len(data), 1000):
                body.feed(data[start : start + 1000])
            assert bytes(body.finish()) == self.CONTENT

    def test_gzip_members_that_follow_each_other_are_one_body(self) -> None:
        import gzip

        from app.bodies import BoundedBody

        body = BoundedBody(1000, "gzip")
        body.feed(gzip.compress(b'{"data": ') + gzip.compress(b"[]}"))

        assert bytes(body.finish()) == b'{"data": []}'

    def test_one_byte_past_the_limit_is_refused(self) -> None:
        import gzip

        from app.bodies import BodyTooLarge, BoundedBody

        at_limit = BoundedBody(len(self.CONTENT), "gzip")
        at_limit.feed(gzip.compress(self.CONTENT))
        past = BoundedBody(len(self.CONTENT) - 1, "gzip")

        assert bytes(at_limit.finish()) == self.CONTENT
        with pytest.raises(BodyTooLarge):
            past.feed(gzip.compress(self.CONTENT))

    @pytest.mark.parametrize(
        ("encoding", "data"),
        [("br", b"x"), ("gzip, gzip", b"x"), ("gzip", b"not gzip"), ("deflate", b"\x00\x01")],
    )
    def test_what_was_not_asked_for_or_is_corrupt_is_refused(
        self, encoding: str, data: bytes
    ) -> None:
        from app.bodies import BadEncoding, BoundedBody

        def read() -> None:
            body = BoundedBody(1000, encoding)
            body.feed(data)
            body.finish()

        with pytest.raises(BadEncoding):
            read()
