"""Redis killed, hung, restarted: every request is answered, enriched, and caching comes back."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import Service, Sim, StartService
from tests.support.delay_proxy import DelayProxy
from tests.support.procs import RedisServer, eventually

TIMEOUT = 0.25
PAGE = "/contacts?instance=acme&per_page=100"


def fully_enriched(response: httpx.Response) -> bool:
    if response.status_code != 200 or response.headers["x-enrichment"] != "complete":
        return False
    data = response.json()["data"]
    return any(c["customer"] for c in data) and any(c["user"] for c in data)


async def timed_get(service: Service, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await service.get(path)
    return response, time.monotonic() - started


class TestRedisKilled:
    async def test_requests_are_served_from_the_crm_without_waiting(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(redis_timeout_seconds=TIMEOUT)
        redis_server.kill()

        for _ in range(10):
            response, elapsed = await timed_get(service, PAGE)
            assert fully_enriched(response)
            assert elapsed < TIMEOUT + 1.0
        assert (await service.get("/health")).json() == {"status": "ok", "redis": "down"}

    async def test_caching_resumes_by_itself_when_redis_returns(
        self, start_service: StartService, redis_server: RedisServer, sim: Sim
    ) -> None:
        service = await start_service(
            redis_timeout_seconds=TIMEOUT, redis_breaker_cooldown_seconds=0.3
        )
        redis_server.kill()
        for _ in range(5):
            assert fully_enriched(await service.get(PAGE))
        redis_server.start()

        async def cached_again() -> bool:
            assert fully_enriched(await service.get(PAGE))
            await service.settle()
            return redis_server.client().exists("customer:acme:1") == 1

        await eventually(cached_again, timeout=10, interval=0.1, message="keys written again")
        sim.state.reset()
        assert fully_enriched(await service.get(PAGE))
        assert sim.stats()["calls"]["customers"] == 0, "served from Redis again"
        assert (await service.get("/health")).json()["redis"] == "up"


class TestRedisHung:
    async def test_no_request_waits_much_past_the_redis_timeout(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        timeout = 0.5
        service = await start_service(
            redis_timeout_seconds=timeout, redis_breaker_cooldown_seconds=30
        )
        assert fully_enriched(await service.get(PAGE))
        redis_server.pause()
        try:
            results = await asyncio.gather(*(timed_get(service, PAGE) for _ in range(20)))
            later = [await timed_get(service, PAGE) for _ in range(10)]
        finally:
            redis_server.resume()

        for response, elapsed in results + later:
            assert fully_enriched(response)
            # Redis's share is one timeout at most, all round trips together (the read;
            # the lease is skipped, the write in the background); the whole request has
            # room for a loaded machine on top, but not for a second timeout
            redis_ms = float(response.headers["server-timing"].split(";dur=")[1].split(",")[0])
            assert redis_ms <= timeout * 1000 * 1.1
            assert elapsed < timeout * 2
        # once the breaker is open, Redis costs nothing: later requests are as fast as the CRM
        assert max(elapsed for _, elapsed in later) < timeout / 2

    async def test_breaker_recovers_after_the_hang(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(
            redis_timeout_seconds=TIMEOUT, redis_breaker_cooldown_seconds=0.3
        )
        redis_server.pause()
        for _ in range(4):
            assert fully_enriched(await service.get(PAGE))
        redis_server.resume()

        async def healthy() -> bool:
            return (await service.get("/health")).json()["redis"] == "up"

        await eventually(healthy, timeout=10, interval=0.1, message="redis up again")
        assert fully_enriched(await service.get(PAGE))
        await service.settle()
        assert redis_server.client().exists("customer:acme:1") == 1

    async def test_state_changes_are_logged_once_not_per_request(
        self, start_service: StartService, redis_server: RedisServer, caplog
    ) -> None:
        caplog.set_level(logging.WARNING)
        service = await start_service(
            redis_timeout_seconds=TIMEOUT, redis_breaker_cooldown_seconds=30
        )
        redis_server.kill()
        for _ in range(30):
            assert fully_enriched(await service.get(PAGE))

        opened = [r for r in caplog.records if "redis.circuit_open" in r.getMessage()]
        assert len(opened) == 1


class TestRedisRestartedUnderLoad:
    async def test_every_request_is_answered_and_enriched(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(
            redis_timeout_seconds=TIMEOUT, redis_breaker_cooldown_seconds=0.2
        )
        responses: list[httpx.Response] = []
        stop = asyncio.Event()

        async def load(worker: int) -> None:
            page = 1
            while not stop.is_set():
                responses.append(
                    await service.get(f"/contacts?instance=acme&per_page=50&page={page}")
                )
                page = page % 20 + 1 + worker

        workers = [asyncio.create_task(load(i)) for i in range(4)]
        try:
            await eventually(lambda: len(responses) > 20, timeout=20)
            redis_server.kill()
            count = len(responses)
            await eventually(lambda: len(responses) > count + 20, timeout=20)
            redis_server.start()
            # the breaker probes again after its cooldown; the load goes on meanwhile
            await eventually(
                lambda: redis_server.client().dbsize() > 0,
                timeout=20,
                message="caching resumed after the restart",
            )
            count = len(responses)
            await eventually(lambda: len(responses) > count + 20, timeout=20)
        finally:
            stop.set()
            await asyncio.gather(*workers)

        assert all(fully_enriched(r) for r in responses), [r.status_code for r in responses]
        assert service.resources["cache"].breaker.state.value == "closed"


class TestCancellationSafety:
    async def test_cancelled_lookups_never_leak_replies_to_later_requests(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        """A cancelled command must not leave its reply for the next command on the connection.

        Redis is paused so that commands are in flight, the callers are cancelled
        mid-command, Redis resumes and sends the replies of the cancelled
        commands. Every later response must hold exactly its own instance's objects.
        """
        service = await start_service(redis_timeout_seconds=1.0, redis_max_connections=8)
        instances = [f"tenant{i}" for i in range(6)]
        for instance in instances:  # warm, so that every later read is answered by Redis
            await service.get(f"/contacts?instance={instance}&per_page=60")
        await service.settle()
        resolver = service.resources["resolver"]
        contacts = service.resources["contacts"]

        rng = random.Random(7)
        for _ in range(5):
            redis_server.pause()
            tasks = [
                asyncio.create_task(
                    contacts.enriched_page(
                        rng.choice(instances), "per_page=60", None, f"cancel-{n}"
                    )
                )
                for n in range(40)
            ]
            await asyncio.sleep(0.05)  # let every task send its MGET into the paused server
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            redis_server.resume()
        await resolver.drain(10)

        async def check(instance: str) -> None:
            response = await service.get(f"/contacts?instance={instance}&per_page=60")
            assert response.status_code == 200
            for contact in response.json()["data"]:
                if contact["customer"] is not None:
                    assert contact["customer"]["instance"] == instance
                    assert contact["customer"]["id"] == contact["customerId"]
                if contact["user"] is not None:
                    assert contact["user"]["instance"] == instance
                    assert contact["user"]["id"] == contact["userId"]

        await asyncio.gather(*(check(rng.choice(instances)) for _ in range(200)))

    async def test_clients_that_disconnect_do_not_disturb_the_others(
        self, service: Service, sim: Sim
    ) -> None:
        sim.state.latency_ms.update(customers=50, users=50, contacts=5)

        async def impatient(n: int) -> None:
            try:
                async with httpx.AsyncClient(base_url=service.url, timeout=0.01 + n * 0.003) as c:
                    await c.get(f"/contacts?instance=acme&per_page=100&page={n % 5 + 1}")
            except httpx.TimeoutException:
                pass

        await asyncio.gather(*(impatient(n) for n in range(40)))
        for page in range(1, 6):
            response = await service.get(f"/contacts?instance=acme&per_page=100&page={page}")
            assert fully_enriched(response)
            for contact in response.json()["data"]:
                if contact["customer"] is not None:
                    assert contact["customer"]["id"] == contact["customerId"]


class TestRedisFull:
    async def test_refused_writes_are_logged_once_per_state_change_and_requests_still_served(
        self, start_service: StartService, redis_server: RedisServer, caplog
    ) -> None:
        caplog.set_level(logging.WARNING)
        service = await start_service(redis_timeout_seconds=TIMEOUT)
        admin = redis_server.admin
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # below what Redis already uses: every write is OOM
        try:
            for page in range(1, 11):
                response = await service.get(f"/contacts?instance=acme&per_page=10&page={page}")
                assert fully_enriched(response)
                await service.settle()
        finally:
            admin.config_set("maxmemory", 0)
        assert redis_server.client().dbsize() == 0, "Redis refused every write"
        await service.get("/contacts?instance=acme&per_page=10&page=11")
        await service.settle()

        def events(name: str) -> list[logging.LogRecord]:
            return [r for r in caplog.records if name in r.getMessage()]

        # Each refused operation (the lease and the write of the misses) once, not per request.
        errors = [r.getMessage() for r in events("redis.command_error")]
        ops = sorted(message.split("'op': '")[1].split("'")[0] for message in errors)
        assert ops == ["lease", "write"], errors
        assert all("maxmemory" in message for message in errors)
        assert len(events("redis.command_recovered")) == 2
        assert redis_server.client().dbsize() > 0, "writes resumed"
        assert not events("redis.circuit_open"), "a refused command is not an outage"


@pytest.fixture
async def redis_proxy(redis_server: RedisServer) -> AsyncIterator[DelayProxy]:
    proxy = await DelayProxy(redis_server.port, delay=0.0).start()
    yield proxy
    await proxy.stop()


async def redis_is_up(service: Service) -> bool:
    return (await service.get("/health")).json()["redis"] == "up"


class TestSlowRedis:
    async def test_redis_adds_at_most_the_timeout_in_total_to_a_cold_request(
        self, start_service: StartService, redis_proxy: DelayProxy
    ) -> None:
        # Every reply 0.4 s late with a 0.5 s timeout: the read fits, a second round trip
        # (the lease) cannot fit in what is left, and must not get a second full timeout.
        redis_proxy.delay = 0.4
        service = await start_service(
            redis_url=redis_proxy.url, redis_timeout_seconds=0.5, cache_lease_wait_seconds=1.0
        )
        await eventually(lambda: redis_is_up(service), timeout=20, message="pool warm")

        cold, elapsed = await timed_get(service, "/contacts?instance=acme&per_page=10")

        assert fully_enriched(cold)
        assert elapsed < 0.5 + 0.25, "one Redis budget for the whole request, not one per call"
        timing = dict(
            (part.strip().partition(";dur=")[0], float(part.partition(";dur=")[2]))
            for part in cold.headers["server-timing"].split(",")
        )
        assert 400 <= timing["redis"] <= 500 + 50
        assert timing["crm"] < 200, "the lease round trip is Redis time, not CRM time"

    async def test_a_redis_100ms_away_is_used_and_its_hits_served(
        self, start_service: StartService, redis_proxy: DelayProxy, sim: Sim
    ) -> None:
        # Connecting costs several round trips (HELLO, CLIENT SETINFO) on top of the command:
        # more than the 0.25 s budget. Connections are opened in the background instead.
        redis_proxy.delay = 0.1
        service = await start_service(redis_url=redis_proxy.url, redis_timeout_seconds=0.25)
        await eventually(lambda: redis_is_up(service), timeout=20, message="pool warm")
        await service.get(PAGE)
        await service.settle()
        calls = dict(sim.stats()["calls"])

        responses = [await service.get(PAGE) for _ in range(5)]

        assert all(fully_enriched(r) for r in responses)
        assert sim.stats()["calls"]["customers"] == calls["customers"], "every one a hit"
        metrics = (await service.get("/metrics")).text
        assert "redis_up 1.0" in metrics
