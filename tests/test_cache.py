"""docs/api.md "Cache keys and values": keys, values, TTLs, round trips, single flight,
USE_REDIS=false."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import orjson
import pytest

from app.cache import Cache
from tests.conftest import Service, Sim, StartService
from tests.support.procs import RedisServer


def cached(redis_server: RedisServer, pattern: str) -> dict[str, bytes]:
    client = redis_server.client()
    return {k.decode(): client.get(k) for k in client.scan_iter(match=pattern, count=1000)}


class TestKeysValuesAndTtls:
    async def test_fetched_entities_are_stored_as_compact_crm_json_for_300s(
        self, service: Service, sim: Sim, redis_server: RedisServer
    ) -> None:
        body = (await service.get("/contacts?instance=acme&per_page=30")).json()
        await service.settle()
        redis = redis_server.client()

        for contact in body["data"]:
            if contact["customer"] is None:
                continue
            key = f"customer:acme:{contact['customerId']}"
            value = redis.get(key)
            assert value == orjson.dumps(contact["customer"])  # compact: no spaces after , or :
            assert 295 <= redis.ttl(key) <= 300
        for contact in body["data"]:
            if contact["user"] is not None:
                assert json.loads(redis.get(f"user:acme:{contact['userId']}")) == contact["user"]

    async def test_ids_the_crm_lacks_are_cached_as_null_with_the_negative_ttl(
        self, service: Service, redis_server: RedisServer
    ) -> None:
        body = (await service.get("/contacts?instance=acme&per_page=200")).json()
        await service.settle()
        absent = [c["customerId"] for c in body["data"] if c["customerId"] and not c["customer"]]
        redis = redis_server.client()

        assert absent
        for customer_id in absent:
            key = f"customer:acme:{customer_id}"
            assert redis.get(key) == b"null"
            assert 55 <= redis.ttl(key) <= 60

    async def test_negative_entries_are_hits_next_time(self, service: Service, sim: Sim) -> None:
        await service.get("/contacts?instance=acme&per_page=200")
        await service.settle()
        calls = dict(sim.stats()["calls"])
        again = await service.get("/contacts?instance=acme&per_page=200")

        assert sim.stats()["calls"]["customers"] == calls["customers"]
        assert sim.stats()["calls"]["users"] == calls["users"]
        assert any(c["customerId"] and c["customer"] is None for c in again.json()["data"])

    async def test_key_prefix_and_ttls_follow_the_settings(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(
            cache_key_prefix="svc1:", cache_ttl_seconds=120, cache_negative_ttl_seconds=10
        )
        await service.get("/contacts?instance=acme&per_page=200")
        await service.settle()
        redis = redis_server.client()
        keys = [k.decode() for k in redis.scan_iter(count=1000)]

        assert keys
        assert all(k.startswith(("svc1:customer:acme:", "svc1:user:acme:")) for k in keys)
        assert 115 <= redis.ttl("svc1:customer:acme:1") <= 120
        assert 5 <= redis.ttl("svc1:customer:acme:97") <= 10  # 97 does not exist in the CRM

    async def test_instances_never_share_keys(
        self, service: Service, redis_server: RedisServer
    ) -> None:
        await service.get("/contacts?instance=acme&per_page=10")
        await service.get("/contacts?instance=globex&per_page=10")
        await service.settle()

        for instance in ("acme", "globex"):
            for key, value in cached(redis_server, f"customer:{instance}:*").items():
                if value != b"null":
                    assert json.loads(value)["instance"] == instance, key

    async def test_negative_ttl_zero_caches_no_absence(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(cache_negative_ttl_seconds=0)
        await service.get("/contacts?instance=acme&per_page=200")
        await service.settle()

        assert b"null" not in cached(redis_server, "*").values()
        assert cached(redis_server, "customer:acme:*")


class TestRoundTrips:
    async def test_an_id_given_twice_is_looked_up_once(self, service: Service, sim: Sim) -> None:
        resolver = service.resources["resolver"]

        resolution = await resolver.resolve(
            "acme", {"customer": ["1", "1", "2"], "user": []}, None, "req-1"
        )

        assert resolution.complete
        assert set(resolution.values["customer"]) == {"1", "2"}
        assert all(resolution.values["customer"].values())
        assert sim.stats()["ids_requested"]["customers"] == 2
        assert sim.stats()["max_fetches_per_id"]["customers"] == 1

    async def test_warm_request_makes_one_redis_round_trip_and_no_crm_call(
        self, service: Service, sim: Sim, redis_server: RedisServer
    ) -> None:
        cold = await service.get("/contacts?instance=acme&per_page=1000")
        await service.settle()
        sim.state.reset()
        redis_server.reset_stats()

        warm = await service.get("/contacts?instance=acme&per_page=1000")

        assert warm.json() == cold.json()
        assert sim.stats()["calls"] == {"contacts": 1, "customers": 0, "users": 0}
        commands = redis_server.command_counts()
        commands.pop("config|resetstat", None)
        assert commands == {"mget": 1}, "customers and users in one MGET, nothing else"

    async def test_cold_request_reads_once_and_writes_once(
        self, service: Service, redis_server: RedisServer
    ) -> None:
        await service.get("/contacts?instance=warm-up&per_page=10")  # Redis now has the scripts
        await service.settle()
        redis_server.reset_stats()
        body = (await service.get("/contacts?instance=acme&per_page=300")).json()
        await service.settle()
        commands = redis_server.command_counts()
        unique = {("c", str(c["customerId"])) for c in body["data"] if c["customerId"]} | {
            ("u", str(c["userId"])) for c in body["data"] if c["userId"]
        }

        assert commands["mget"] == 1
        # Two scripts: one takes the leases (one HSET into the instance's lease hash), one
        # stores the values (SET EX) and releases the leases (one HDEL); redis.call inside
        # them counts in commandstats too.
        assert commands["evalsha"] == 2
        assert commands["set"] == len(unique)
        assert commands["hset"] == 1
        assert commands["hdel"] == 1
        assert not {"multi", "exec", "expire"} & set(commands)
        assert list(redis_server.client().scan_iter(match="lease:*")) == [], "hash deleted"

    @pytest.mark.parametrize("scripts", [True, False], ids=["scripts", "no-scripts"])
    async def test_leases_of_a_lease_call_that_failed_half_way_are_released(
        self,
        service: Service,
        redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch,
        scripts: bool,
    ) -> None:
        if not scripts:  # as on a cluster, or where an ACL denies them
            monkeypatch.setattr(service.resources["cache"], "_scripts", None)
        real = Cache.take_leases

        async def half_failed(
            self: Cache,
            key: str,
            fields: Sequence[str],
            token: str,
            ttl_ms: int,
            budget: object = None,
        ) -> None:
            await real(self, key, fields[: len(fields) // 2], token, ttl_ms)  # one call ran...
            # ...and the other failed: the caller cannot tell which leases it holds

        monkeypatch.setattr(Cache, "take_leases", half_failed)

        response = await service.get("/contacts?instance=acme&per_page=50")
        await service.settle()

        assert response.headers["x-enrichment"] == "complete"
        assert list(redis_server.client().scan_iter(match="lease:*")) == []
        assert list(redis_server.client().scan_iter(match="customer:acme:*"))

    async def test_partially_warm_page_fetches_only_the_misses(
        self, service: Service, sim: Sim
    ) -> None:
        await service.get("/contacts?instance=acme&per_page=100")
        await service.settle()
        sim.state.reset()
        await service.get("/contacts?instance=acme&per_page=150")

        stats = sim.stats()
        assert 0 < stats["ids_requested"]["customers"] <= 50
        assert stats["unique_ids_requested"]["customers"] == stats["ids_requested"]["customers"]


class TestSingleFlight:
    async def test_16_concurrent_cold_requests_fetch_each_id_once(
        self, service: Service, sim: Sim
    ) -> None:
        sim.state.latency_ms.update(customers=100, users=100)
        responses = await asyncio.gather(
            *(service.get("/contacts?instance=acme&per_page=1000") for _ in range(16))
        )
        stats = sim.stats()

        assert all(r.status_code == 200 for r in responses)
        assert all(r.headers["x-enrichment"] == "complete" for r in responses)
        assert len({r.content for r in responses}) == 1
        assert stats["max_fetches_per_id"] == {"customers": 1, "users": 1}
        assert stats["ids_requested"]["customers"] == stats["unique_ids_requested"]["customers"]

    async def test_overlapping_pages_share_the_common_ids(self, service: Service, sim: Sim) -> None:
        sim.state.latency_ms.update(customers=100, users=100)
        await asyncio.gather(
            service.get("/contacts?instance=acme&per_page=300&page=1"),
            service.get("/contacts?instance=acme&per_page=200&page=1"),
            service.get("/contacts?instance=acme&per_page=100&page=2"),
        )

        assert sim.stats()["max_fetches_per_id"]["customers"] == 1

    async def test_same_ids_of_two_instances_are_fetched_for_each(
        self, service: Service, sim: Sim
    ) -> None:
        sim.state.latency_ms.update(customers=50)
        a, b = await asyncio.gather(
            service.get("/contacts?instance=acme&per_page=20"),
            service.get("/contacts?instance=globex&per_page=20"),
        )

        assert a.json()["data"][0]["customer"]["instance"] == "acme"
        assert b.json()["data"][0]["customer"]["instance"] == "globex"
        assert sim.stats()["calls"]["customers"] == 2


class TestWithoutRedis:
    async def test_use_redis_false_never_connects(
        self, start_service: StartService, sim: Sim, redis_server: RedisServer
    ) -> None:
        before = redis_server.admin.info("stats")["total_connections_received"]
        service = await start_service(redis=None, redis_url=redis_server.url)
        for _ in range(3):
            response = await service.get("/contacts?instance=acme&per_page=300")
            assert response.status_code == 200
            assert response.headers["x-enrichment"] == "complete"
        health = (await service.get("/health")).json()

        assert health == {"status": "ok", "redis": "disabled"}
        assert redis_server.admin.info("stats")["total_connections_received"] == before
        stats = sim.stats()
        assert stats["calls"]["customers"] == 3 * 3  # 300 unique customers: 3 batches each time
        assert max(stats["batch_sizes"]["customers"]) <= 100

    async def test_use_redis_false_still_deduplicates(
        self, start_service: StartService, sim: Sim
    ) -> None:
        service = await start_service(redis=None)
        await service.get("/contacts?instance=acme&per_page=300&dup=1")

        assert sim.stats()["ids_requested"]["customers"] == 5


class TestLimits:
    async def test_objects_above_cache_max_value_bytes_are_served_but_never_stored(
        self, start_service: StartService, sim: Sim, redis_server: RedisServer
    ) -> None:
        first = (await start_service()).http
        body = (await first.get("/contacts?instance=acme&per_page=30")).json()
        sizes = sorted(len(orjson.dumps(c["customer"])) for c in body["data"] if c["customer"])
        limit = sizes[len(sizes) // 2]  # about half the customers are larger
        redis_server.admin.flushall()
        service = await start_service(cache_max_value_bytes=limit)
        sim.state.reset()

        response = await service.get("/contacts?instance=other&per_page=30")
        await service.settle()
        stored = cached(redis_server, "customer:other:*")

        assert response.headers["x-enrichment"] == "complete"
        served = {str(c["customerId"]): c["customer"] for c in response.json()["data"]}
        large = {i for i, c in served.items() if c is not None and len(orjson.dumps(c)) > limit}
        small = {i for i, c in served.items() if c is not None and i not in large}
        assert large
        assert small
        assert not large & {key.rsplit(":", 1)[1] for key in stored}, "no large value stored"
        assert small <= {key.rsplit(":", 1)[1] for key in stored}, "the others are"
        assert all(len(value) <= limit for value in stored.values())
        requested = sim.stats()["ids_requested"]["customers"]
        again = await service.get("/contacts?instance=other&per_page=30")
        refetched = sim.stats()["ids_requested"]["customers"] - requested
        assert refetched == len(large), "only the uncached large objects go to the CRM again"
        assert again.json() == response.json()


class TestPerInstanceCounts:
    async def test_the_least_recently_served_instances_are_forgotten_past_the_bound(
        self, service: Service
    ) -> None:
        from app.resolver import EntityResolver

        resolver: EntityResolver = service.resources["resolver"]
        resolver._max_counted = 2
        for instance in ("one", "two", "one", "three"):
            await service.get(f"/contacts?instance={instance}&per_page=5")

        assert resolver.counts("one") != (0, 0), "served recently: kept"
        assert resolver.counts("three") != (0, 0)
        assert resolver.counts("two") == (0, 0), "the least recently served: forgotten"
        assert len(resolver._counts) == 2


class TestFailedBatches:
    async def test_a_batch_that_crashes_releases_its_leases_and_caches_nothing(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(cache_lease_wait_seconds=30)
        upstream = service.resources["resolver"]._upstream

        async def crash(*_: object, **__: object) -> dict[str, bytes]:
            raise RecursionError("maximum recursion depth exceeded while decoding")

        upstream.entities = crash  # shadows the method on this instance only
        response = await service.get("/contacts?instance=acme&per_page=20")
        await service.settle()

        assert response.status_code == 200
        assert response.headers["x-enrichment"] == "partial"
        assert cached(redis_server, "lease:*") == {}, "every lease released"
        assert cached(redis_server, "customer:*") == {}, "nothing of a failed batch cached"

        del upstream.entities
        again = await service.get("/contacts?instance=acme&per_page=20")
        assert again.headers["x-enrichment"] == "complete"
        assert "crm;dur" in again.headers["server-timing"], "fetched again, at once"


class TestForeignValues:
    @pytest.mark.parametrize("stored", [b"{not json", b'{"id":1,"x":NaN}', b"\xff\xfe"])
    async def test_a_value_in_redis_that_is_not_strict_json_is_a_miss_and_is_replaced(
        self, service: Service, sim: Sim, redis_server: RedisServer, stored: bytes
    ) -> None:
        page = "/contacts?instance=acme&per_page=5"
        first = (await service.get(page)).json()
        await service.settle()
        customer_id = next(c["customerId"] for c in first["data"] if c["customer"])
        key = f"customer:acme:{customer_id}"
        redis_server.client().set(key, stored, ex=300)  # another writer, or a bug
        sim.state.reset()

        response = await service.get(page)
        await service.settle()

        assert response.json() == first, "served from the CRM, as it was"
        assert sim.stats()["ids_requested"]["customers"] == 1, "only that id was a miss"
        assert json.loads(redis_server.client().get(key)) == next(
            c["customer"] for c in first["data"] if c["customerId"] == customer_id
        )
