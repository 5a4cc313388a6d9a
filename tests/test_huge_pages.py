"""docs/limits.md: a huge page is served whole, split into Redis
commands of at most ~1,000 keys, without opening the breaker, leaving leases behind or
holding up other requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import Sim, StartService
from tests.support.procs import RedisServer, eventually, memory_bytes
from tests.support.servers import InProcessServer

CONTACTS = 20_000  # 40,000 ids: 40 times the most keys one command may carry
HUGE_PAGE = orjson.dumps(
    {"data": [{"id": n, "customerId": n, "userId": n} for n in range(1, CONTACTS + 1)]}
)


@contextlib.asynccontextmanager
async def contacts_api(page: bytes) -> AsyncIterator[str]:
    """A contacts API whose every page is `page`."""

    async def contacts(_: Request) -> Response:
        return Response(page, media_type="application/json")

    server = await InProcessServer(
        Starlette(routes=[Route("/{instance}/contacts", contacts)])
    ).start()
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
async def huge_contacts_api() -> AsyncIterator[str]:
    """A contacts API whose every page has `CONTACTS` contacts (the CRM is the simulator)."""
    async with contacts_api(HUGE_PAGE) as url:
        yield url


def redis_errors(metrics: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "redis_errors_total"
    )


class TestHugePage:
    async def test_is_served_whole_in_small_commands_without_tripping_anything(
        self,
        start_service: StartService,
        huge_contacts_api: str,
        sim: Sim,
        redis_server: RedisServer,
    ) -> None:
        # A budget for 40,000 keys even on a loaded machine: this is about their split.
        service = await start_service(
            whatsapp_api_url=huge_contacts_api, crm_api_url=sim.url, redis_timeout_seconds=2
        )
        await service.get("/health")
        errors_before = redis_errors((await service.get("/metrics")).text)
        redis_server.reset_stats()
        health_latencies: list[float] = []

        async def probe_health() -> None:
            while True:
                started = time.monotonic()
                assert (await service.get("/health")).status_code == 200
                health_latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.02)

        prober = asyncio.create_task(probe_health())
        try:
            cold = await service.get("/contacts?instance=acme")
            await service.settle()
        finally:
            prober.cancel()
        mgets = redis_server.command_counts().get("mget")
        warm = await service.get("/contacts?instance=acme")
        metrics = (await service.get("/metrics")).text
        client = redis_server.client()

        assert cold.status_code == 200
        assert cold.headers["x-enrichment"] == "complete"
        assert len(cold.json()["data"]) == CONTACTS
        assert mgets == 2 * CONTACTS // 1000, "one MGET per 1,000 keys, none larger"
        assert client.keys("lease:*") == [], "no lease left behind"
        stored = sum(1 for _ in client.scan_iter(match="*:acme:*", count=10_000))
        assert stored == 2 * CONTACTS, "every value stored (found or null)"
        assert warm.json() == cold.json()
        assert "crm" not in warm.headers["server-timing"], "all hits"
        # The process's metrics, shared with the tests before this one: their change.
        assert redis_errors(metrics) == errors_before, "no Redis call failed"
        assert service.resources["cache"].breaker.state.value == "closed"
        assert health_latencies
        assert max(health_latencies) < 1.0, "other requests kept being served"


class TestMemoryAfterAHugePage:
    async def test_is_given_back_to_the_system(self) -> None:
        from tests.support.hostile import HostileUpstream
        from tests.support.replicas import ServiceProcess

        # Large enough that what a process keeps anyway (~20 MB) is small beside it.
        page = orjson.dumps(
            {"data": [{"id": n, "customerId": n, "userId": 1} for n in range(1, 90_001)]}
        )
        crm = await HostileUpstream().start()  # knows one customer and one user: others null
        async with contacts_api(page) as contacts_url:
            service = ServiceProcess(
                {
                    "WHATSAPP_API_URL": contacts_url,
                    "CRM_API_URL": crm.url,
                    "USE_REDIS": "false",
                    "LOG_LEVEL": "warning",
                }
            )
            await asyncio.to_thread(service.start)
            try:
                async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
                    assert (await client.get("/health")).status_code == 200
                    idle = memory_bytes(service.pid)
                    # The peak while the page is served, not after: what the process frees
                    # before its answer arrives here (the write-back's keys) counts too.
                    request = asyncio.create_task(client.get("/contacts?instance=acme"))
                    samples = [idle]
                    while not request.done():
                        samples.append(memory_bytes(service.pid))
                        await asyncio.wait([request], timeout=0.01)
                    response = await request
                    peak = max(*samples, memory_bytes(service.pid))
                    grown = peak - idle
                    # Without malloc_trim the process keeps about half of its peak for good
                    # (glibc's arenas); with it, about a quarter.
                    await eventually(
                        lambda: memory_bytes(service.pid) < idle + grown * 0.4,
                        timeout=20,
                        message="most of what the page took is given back",
                    )
            finally:
                service.stop()
                await crm.stop()

        assert response.status_code == 200
        assert grown > 60 * 1024 * 1024, "the page took memory worth giving back"
