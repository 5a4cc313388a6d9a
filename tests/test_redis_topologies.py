"""REDIS_MODE=cluster and REDIS_MODE=sentinel against real topologies, including failovers.

The cluster is three masters with a replica each (`redis-cli --cluster create`), the
sentinel set-up a primary, a replica and one or three sentinels; both detect a dead node
in about a second. Every response is checked value by value against the simulated CRM,
and the blocking waits for a failover run in a thread: the service shares this loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import operator
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot

from simupstream import data
from tests.conftest import Service, Sim, StartService
from tests.support.procs import eventually
from tests.support.topologies import RedisClusterFixture, SentinelFixture, SlotMap

pytestmark = pytest.mark.slow

INSTANCE = "acme"
# Per node: 60% of it (app.redis_client.NODE_TIMEOUT_SHARE). Generous, so that on a loaded
# machine a healthy node answers in time, and only the failed master's keys miss.
TIMEOUT = 1.0
ADMIN_TOKEN = "topology-admin-token"
LOAD_PAGES = [f"/contacts?instance={INSTANCE}&per_page=100&page={n}" for n in range(1, 11)]


# -- what the simulated CRM says every contact must carry ----------------------------------


def expected_refs(sim: Sim, index: int) -> dict[str, tuple[str, Any]]:
    """For contact `index`: {"customer": (key, object or None), "user": (...)}, ids not null."""
    customers, users = sim.state.customers, sim.state.users
    contact = data.contact(INSTANCE, index, customers, users)
    refs: dict[str, tuple[str, Any]] = {}
    if contact["customerId"] is not None:
        refs["customer"] = (
            f"customer:{INSTANCE}:{contact['customerId']}",
            data.customer(INSTANCE, 1 + index % customers, customers),
        )
    if contact["userId"] is not None:
        refs["user"] = (
            f"user:{INSTANCE}:{contact['userId']}",
            data.user(INSTANCE, 1 + index % (users + 1), users),
        )
    return refs


def check_page(sim: Sim, response: httpx.Response) -> dict[str, Any]:
    """Assert every contact carries exactly the CRM's customer and user; the keys involved."""
    assert response.status_code == 200, response.text
    assert response.headers["x-enrichment"] == "complete"
    keys: dict[str, Any] = {}
    for contact in response.json()["data"]:
        index = int(contact["id"].removeprefix("ct_"))
        refs = expected_refs(sim, index)
        for entity in ("customer", "user"):
            if entity in refs:
                key, expected = refs[entity]
                assert contact[entity] == expected, (index, entity)
                keys[key] = expected
            else:
                assert contact[entity] is None, (index, entity)
    return keys


def page_is_correct(sim: Sim, response: httpx.Response) -> bool:
    try:
        check_page(sim, response)
    except (AssertionError, KeyError, ValueError):
        return False
    return True


def crm_calls(sim: Sim) -> int:
    calls = sim.stats()["calls"]
    return int(calls["customers"] + calls["users"])


def crm_fetched_keys(sim: Sim) -> set[str]:
    """The cache key of every id the CRM was asked for since the last reset."""
    fetched = sim.state.stats(per_id=True)["fetches_per_id"]
    return {
        f"{entity}:{instance_and_id}"
        for endpoint, entity in (("customers", "customer"), ("users", "user"))
        for instance_and_id in fetched.get(endpoint, {})
    }


def cache_lookups() -> list[float]:
    """The service's cache hits and misses so far (this process's Prometheus counters)."""
    return [
        sum(REGISTRY.get_sample_value(name, {"entity": e}) or 0.0 for e in ("customer", "user"))
        for name in ("cache_hits_total", "cache_misses_total")
    ]


def values_on_node(client: redis.Redis, keys: list[str]) -> dict[str, Any]:
    """GET each key on one node directly (no cluster client), decoded."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    return {
        key: (None if raw is None else json.loads(raw))
        for key, raw in zip(keys, pipe.execute(), strict=True)
    }


# -- load while a node fails -------------------------------------------------------------


@dataclass
class Load:
    """Workers requesting `pages` round robin; every response checked against the CRM."""

    service: Service
    sim: Sim
    pages: list[str]
    served: list[tuple[float, float, bool]] = field(default_factory=list)  # at, seconds, ok
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._work(n)) for n in range(4)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _work(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            page = self.pages[n % len(self.pages)]
            n += 1
            started = time.monotonic()
            response = await self.service.get(page)
            elapsed = time.monotonic() - started
            ok = page_is_correct(self.sim, response)
            if not ok:
                self.failures.append(
                    f"{page}: {response.status_code} {response.headers.get('x-enrichment')}"
                )
            self.served.append((started, elapsed, ok))

    async def more(self, count: int, timeout: float = 20) -> None:
        target = len(self.served) + count
        await eventually(lambda: len(self.served) >= target, timeout=timeout, interval=0.01)

    def between(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.served if start <= s[0] < end]

    def report(self) -> str:
        latencies = sorted(elapsed for _, elapsed, _ in self.served)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        return (
            f"{len(latencies)} requests, p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        )


async def wait_for(check: Callable[[], Any]) -> float:
    """Run a blocking wait in a thread (the service shares this loop); the seconds it took."""
    started = time.monotonic()
    await asyncio.to_thread(check)
    return time.monotonic() - started


async def warm(service: Service, sim: Sim, pages: list[str]) -> None:
    for page in pages:
        check_page(sim, await service.get(page))
    await service.settle()


async def makes_no_crm_call(service: Service, sim: Sim, page: str) -> bool:
    """Request `page` once to (re)cache it, then again: the second one must not reach the CRM."""
    check_page(sim, await service.get(page))
    await service.settle()
    before = crm_calls(sim)
    check_page(sim, await service.get(page))
    return crm_calls(sim) == before


# -- Redis Cluster -------------------------------------------------------------------------


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[RedisClusterFixture]:
    """Three masters and three replicas; `cluster-require-full-coverage` from `indirect`."""
    topology = RedisClusterFixture(require_full_coverage=getattr(request, "param", False))
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture
async def cluster_service(
    request: pytest.FixtureRequest, start_service: StartService, cluster: RedisClusterFixture
) -> Service:
    extra: dict[str, Any] = getattr(request, "param", {})
    return await start_service(
        redis_mode="cluster",
        redis_url=cluster.url,
        redis_timeout_seconds=TIMEOUT,
        admin_token=ADMIN_TOKEN,
        **extra,
    )


@pytest.fixture
def node_round_trips(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Pipelines and single commands the service's cluster client sends, per node port."""
    counts: dict[str, int] = {}
    pipeline, command = ClusterNode.execute_pipeline, ClusterNode.execute_command

    async def counted_pipeline(self: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        counts[str(self.port)] = counts.get(str(self.port), 0) + 1
        return await pipeline(self, *args, **kwargs)

    async def counted_command(self: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        counts[f"{self.port} single"] = counts.get(f"{self.port} single", 0) + 1
        return await command(self, *args, **kwargs)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", counted_pipeline)
    monkeypatch.setattr(ClusterNode, "execute_command", counted_command)
    return counts


def keys_by_master(slot_map: SlotMap, keys: list[str]) -> dict[int, list[str]]:
    owned: dict[int, list[str]] = {}
    for key in keys:
        owned.setdefault(slot_map.port_for_key(key), []).append(key)
    return owned


class TestRedisCluster:
    async def test_a_page_of_1000_is_cached_across_every_master_with_every_value_right(
        self,
        cluster_service: Service,
        cluster: RedisClusterFixture,
        sim: Sim,
        node_round_trips: dict[str, int],
    ) -> None:
        page = f"/contacts?instance={INSTANCE}&per_page=1000"
        cold = await cluster_service.get(page)
        expected = check_page(sim, cold)
        await cluster_service.settle()

        slot_map = cluster.slot_map()
        owned = keys_by_master(slot_map, list(expected))
        assert set(owned) == set(cluster.master_ports()), "keys on every master"
        for port, keys in owned.items():
            node = cluster.servers[port].admin
            assert values_on_node(node, keys) == {key: expected[key] for key in keys}
            assert node.dbsize() == len(keys), "nothing else stored (leases released)"

        for server in cluster.masters():
            server.reset_stats()
        sim.state.reset()
        node_round_trips.clear()
        warm_response = await cluster_service.get(page)

        assert check_page(sim, warm_response) == expected
        assert crm_calls(sim) == 0
        # one round trip per master (a pipeline, sent in parallel), nothing else
        assert node_round_trips == {str(port): 1 for port in owned}
        for port, keys in owned.items():
            calls = cluster.servers[port].command_counts()
            slots = {key_slot(key.encode()) for key in keys}
            # MGET cannot span slots: one MGET per slot the page touches on that master
            assert calls.get("mget") == len(slots)
            # (REPLCONF: a replica acknowledging replication, not the service)
            assert set(calls) - {"replconf"} <= {"mget", "config|resetstat", "info"}
        print(
            f"\n[cluster] {len(expected)} keys over masters "
            f"{ {p: len(k) for p, k in owned.items()} }; warm read: one pipeline per master "
            f"with {', '.join(str(cluster.servers[p].command_counts()['mget']) for p in owned)}"
            " MGETs"
        )

    async def test_invalidation_and_stats_reach_every_master(
        self, cluster_service: Service, cluster: RedisClusterFixture, sim: Sim
    ) -> None:
        """SCAN runs on each master, UNLINK goes to each key's master (pipelined per node)."""
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        expected = check_page(sim, await cluster_service.get(LOAD_PAGES[0]))
        await cluster_service.settle()
        customers = sum(key.startswith("customer:") for key in expected)

        stats = (await cluster_service.get(f"/cache/{INSTANCE}/stats", headers=admin)).json()
        assert stats["cached"] == {"customers": customers, "users": len(expected) - customers}

        one = next(key for key in expected if key.startswith("customer:"))
        response = await cluster_service.http.delete(
            f"/cache/{INSTANCE}/customers/{one.rsplit(':', 1)[1]}", headers=admin
        )
        assert response.status_code == 204
        assert cluster.master_for_key(one).admin.exists(one) == 0

        response = await cluster_service.http.delete(f"/cache/{INSTANCE}", headers=admin)
        assert response.json() == {"deleted": len(expected) - 1}
        assert all(size == 0 for size in cluster.dbsize_by_port().values())

    @pytest.mark.parametrize(
        ("cluster", "failure", "cluster_service"),
        [
            (False, "kill", {}),
            (False, "hang", {}),
            (True, "kill", {}),
            # the TTL-aware read (GET + PTTL pipeline) must degrade per node the same way
            (False, "kill", {"cache_refresh_ahead_seconds": 30}),
        ],
        indirect=["cluster", "cluster_service"],
        ids=["killed", "hung", "killed-full-coverage", "killed-refresh-ahead"],
    )
    async def test_a_failed_master_is_survived_and_its_replica_takes_over(
        self,
        cluster_service: Service,
        cluster: RedisClusterFixture,
        sim: Sim,
        failure: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Every request is answered in full throughout; the CRM stands in for the failed
        master's slots (for every slot while a full-coverage cluster is down), and caching
        resumes on all slots once its replica has taken over."""
        caplog.set_level(logging.WARNING)
        service = cluster_service
        await warm(service, sim, LOAD_PAGES)
        victim = cluster.master_ports()[0]  # the node REDIS_URL names, for good measure
        replica = cluster.replica_ports_of(victim)[0]
        before = cluster.slot_map()

        async with Load(service, sim, LOAD_PAGES) as load:
            await load.more(20)
            sim.state.reset()
            lookups_before = cache_lookups()
            failed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill if failure == "kill" else cluster.pause, victim)
            failover = await wait_for(lambda: cluster.wait_for_promotion(victim, replica))
            promoted_at = time.monotonic()
            fetched_during_outage = crm_fetched_keys(sim)
            hits, misses = map(operator.sub, cache_lookups(), lookups_before)
            await load.more(40)

        assert not load.failures, load.failures[:5]
        assert max(elapsed for _, elapsed, _ in load.served) < TIMEOUT + 1.0
        outage = load.between(failed_at, promoted_at)
        assert outage, "requests were served while the master was down"
        assert fetched_during_outage
        hit_ratio = hits / (hits + misses)
        if not cluster.require_full_coverage:
            # the other masters kept serving their slots: about two thirds were hits
            assert hit_ratio > 0.5
        if failure == "kill" and not cluster.require_full_coverage:
            # only ids of the failed master's slots reached the CRM (a hung master can be
            # slower than the whole read's deadline once in a while, so not asserted there)
            assert {before.port_for_key(key) for key in fetched_during_outage} == {victim}
        # The victim's outage (on a loaded machine a healthy node can also miss its share of
        # the deadline now and then: that is logged too, and is not what this counts).
        downs = [
            r
            for r in caplog.records
            if "redis.cluster_node_down" in r.getMessage() and f":{victim}'" in r.getMessage()
        ]
        if not cluster.require_full_coverage:
            assert len(downs) == 1, "logged once, not per request"

        started = time.monotonic()
        await eventually(
            lambda: makes_no_crm_call(service, sim, LOAD_PAGES[0]),
            timeout=15,
            interval=0.05,
            message="cached again on every slot",
        )
        healed = time.monotonic() - started
        for page in LOAD_PAGES[1:]:
            sim.state.reset()
            check_page(sim, await service.get(page))
            assert crm_calls(sim) == 0, page
        assert (await service.get("/health")).json()["redis"] == "up"

        # writes resume on the promoted replica: a page never seen before lands there
        fresh = f"/contacts?instance={INSTANCE}&per_page=200&page=40"
        expected = check_page(sim, await service.get(fresh))
        await service.settle()
        on_replica = [k for k in expected if cluster.slot_map().port_for_key(k) == replica]
        assert on_replica
        assert values_on_node(cluster.servers[replica].admin, on_replica) == {
            key: expected[key] for key in on_replica
        }
        page_ids = {key for page in LOAD_PAGES for key in expected_page_keys(sim, page)}
        print(
            f"\n[cluster, master {failure}, full coverage {cluster.require_full_coverage}] "
            f"failure -> promotion {failover:.2f} s, {len(outage)} requests served meanwhile, "
            f"all complete; cache hit ratio meanwhile {hit_ratio:.0%}; ids from the CRM "
            f"{len(fetched_during_outage)} ({len(fetched_during_outage) / len(page_ids):.0%} "
            "of the pages' ids); "
            f"cached on every slot again {healed:.2f} s after promotion; {load.report()}"
        )


def expected_page_keys(sim: Sim, page: str) -> set[str]:
    query = dict(part.split("=") for part in page.split("?")[1].split("&"))
    per_page, number = int(query["per_page"]), int(query["page"])
    first = (number - 1) * per_page
    return {
        key
        for index in range(first, first + per_page)
        for key, _ in expected_refs(sim, index).values()
    }


# -- Sentinel ------------------------------------------------------------------------------


@pytest.fixture
def sentinel(request: pytest.FixtureRequest) -> Iterator[SentinelFixture]:
    """One sentinel, or as many as the test's `indirect` parameter says."""
    topology = SentinelFixture(sentinels=getattr(request, "param", 1)).start()
    yield topology
    topology.stop()


@pytest.fixture
async def sentinel_service(start_service: StartService, sentinel: SentinelFixture) -> Service:
    return await start_service(
        redis_mode="sentinel",
        redis_sentinels=sentinel.sentinel_addresses,
        redis_sentinel_master=sentinel.master_name,
        redis_timeout_seconds=TIMEOUT,
    )


class TestRedisSentinel:
    async def test_pages_are_cached_on_the_primary(
        self, sentinel_service: Service, sentinel: SentinelFixture, sim: Sim
    ) -> None:
        expected = check_page(sim, await sentinel_service.get(LOAD_PAGES[0]))
        await sentinel_service.settle()

        assert values_on_node(sentinel.primary.admin, list(expected)) == expected
        sim.state.reset()
        check_page(sim, await sentinel_service.get(LOAD_PAGES[0]))
        assert crm_calls(sim) == 0

    @pytest.mark.parametrize("sentinel", [1, 3], indirect=True, ids=["1-sentinel", "3-sentinels"])
    async def test_killed_primary_no_request_fails_and_caching_resumes_on_the_new_one(
        self, sentinel_service: Service, sentinel: SentinelFixture, sim: Sim
    ) -> None:
        service = sentinel_service
        await warm(service, sim, LOAD_PAGES)

        async with Load(service, sim, LOAD_PAGES) as load:
            await load.more(20)
            killed_at = time.monotonic()
            await asyncio.to_thread(sentinel.kill_primary)
            failover = await wait_for(sentinel.wait_for_promotion)
            promoted_at = time.monotonic()
            await load.more(40)

        assert not load.failures, load.failures[:5]
        assert max(elapsed for _, elapsed, _ in load.served) < TIMEOUT + 1.0
        outage = load.between(killed_at, promoted_at)
        assert outage

        started = time.monotonic()
        await eventually(
            lambda: makes_no_crm_call(service, sim, LOAD_PAGES[0]),
            timeout=15,
            interval=0.05,
            message="served from the new primary",
        )
        healed = time.monotonic() - started
        fresh = f"/contacts?instance={INSTANCE}&per_page=100&page=30"
        expected = check_page(sim, await service.get(fresh))
        await service.settle()
        assert values_on_node(sentinel.replica.admin, list(expected)) == expected
        print(
            f"\n[sentinel failover, {len(sentinel.sentinels)} sentinel(s)] "
            f"kill -> promotion {failover:.2f} s, "
            f"{len(outage)} requests served meanwhile, all complete; "
            f"cached again {healed:.2f} s after promotion; {load.report()}"
        )

    async def test_switchover_never_lets_readonly_reach_a_request(
        self, sentinel_service: Service, sentinel: SentinelFixture, sim: Sim
    ) -> None:
        """SENTINEL FAILOVER keeps the old primary, as a replica: a write to it says READONLY.

        A pooled connection still on the old primary serves reads (it replicates the new
        one), and its first write fails as a miss and reconnects it to the new primary.
        """
        service = sentinel_service
        await warm(service, sim, LOAD_PAGES)
        async with Load(service, sim, LOAD_PAGES) as load:
            await load.more(20)
            await asyncio.to_thread(sentinel.switchover)
            switchover = await wait_for(sentinel.wait_for_promotion)
            demotion = await wait_for(sentinel.wait_for_demotion)
            await load.more(40)

        assert not load.failures, load.failures[:5]
        fresh_pages = itertools.count(30)
        attempts = 0

        async def writes_land_on_the_new_primary() -> bool:
            nonlocal attempts
            attempts += 1
            page = f"/contacts?instance={INSTANCE}&per_page=100&page={next(fresh_pages)}"
            expected = check_page(sim, await service.get(page))
            await service.settle()
            return values_on_node(sentinel.replica.admin, list(expected)) == expected

        await eventually(writes_land_on_the_new_primary, timeout=15, interval=0.05)
        sim.state.reset()
        check_page(sim, await service.get(LOAD_PAGES[0]))
        assert crm_calls(sim) == 0
        print(
            f"\n[sentinel switchover] promotion {switchover:.2f} s, old primary demoted "
            f"{demotion:.2f} s later; {load.report()}; "
            f"fresh pages until writes landed on the new primary: {attempts}"
        )
