"""docs/design.md "Scaling out": three replicas behind a real nginx share one Redis.

Every process is real: redis-server, the simulated upstream, three uvicorn
services and nginx, all on loopback. The tests run in file order on one
cluster; the last one kills a replica.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.procs import RedisServer, eventually
from tests.support.replicas import NginxProcess, ServiceProcess, SimProcess, sample, scrape

pytestmark = pytest.mark.slow

REPLICAS = 3
PAGE = "/contacts?instance=acme&per_page=100"


@dataclass
class Cluster:
    redis: RedisServer
    sim: SimProcess
    replicas: list[ServiceProcess]
    nginx: NginxProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("replicas")
    redis = RedisServer().start()
    sim = SimProcess(workdir=root / "sim")
    replicas = [
        ServiceProcess(
            {
                "WHATSAPP_API_URL": f"http://127.0.0.1:{sim.port}",
                "CRM_API_URL": f"http://127.0.0.1:{sim.port}",
                "REDIS_URL": redis.url,
                "LOG_LEVEL": "info",
            },
            workdir=root / f"replica-{n}",
        )
        for n in range(REPLICAS)
    ]
    nginx = NginxProcess(
        [r.port for r in replicas], max_fails=1, fail_timeout=10, workdir=root / "nginx"
    )
    try:
        sim.start()
        for replica in replicas:  # all three boot at once
            replica.spawn()
        for replica in replicas:
            replica.wait_ready()
        nginx.start()
        yield Cluster(redis, sim, replicas, nginx)
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()
        sim.stop()
        redis.stop()


def contacts_served(replica: ServiceProcess) -> float:
    return sample(
        scrape(replica.url),
        "http_requests_total",
        method="GET",
        route="/contacts",
        status="200",
    )


async def test_what_one_replica_cached_is_a_hit_on_the_others(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=10) as direct:
        warm = await direct.get(cluster.replicas[0].url + PAGE)
    assert warm.status_code == 200
    expected_keys = len({c["customerId"] for c in warm.json()["data"] if c["customerId"]}) + len(
        {c["userId"] for c in warm.json()["data"] if c["userId"]}
    )
    redis = cluster.redis.client()
    await eventually(  # the values, not the leases taken meanwhile
        lambda: (
            sum(1 for p in ("customer:*", "user:*") for _ in redis.scan_iter(p, 1000))
            >= expected_keys
        ),
        message="the first replica stored the page's customers and users",
    )
    cluster.sim.reset()

    async with httpx.AsyncClient(base_url=cluster.nginx.url, timeout=10) as lb:
        responses = await asyncio.gather(*(lb.get(PAGE) for _ in range(30)))

    assert all(r.status_code == 200 for r in responses)
    assert all(r.json() == warm.json() for r in responses)
    assert {r.headers["x-enrichment"] for r in responses} == {"complete"}
    calls = cluster.sim.stats()["calls"]
    assert calls == {"contacts": 30, "customers": 0, "users": 0}, "no replica asked the CRM"


async def test_nginx_spreads_the_load_over_every_replica(cluster: Cluster) -> None:
    before = [contacts_served(r) for r in cluster.replicas]
    async with httpx.AsyncClient(base_url=cluster.nginx.url, timeout=10) as lb:
        for _ in range(60):
            assert (await lb.get(PAGE)).status_code == 200
    served = [contacts_served(r) - b for r, b in zip(cluster.replicas, before, strict=True)]

    print(f"\nrequests per replica out of 60: {served}")
    assert sum(served) == 60
    assert min(served) >= 10, f"each of 3 replicas serves a fair share: {served}"


async def test_killing_a_replica_mid_load_loses_no_request(cluster: Cluster) -> None:
    victim, survivors = cluster.replicas[1], [cluster.replicas[0], cluster.replicas[2]]
    survivors_before = sum(contacts_served(r) for r in survivors)
    statuses: list[int] = []
    completed_at_kill = 0
    deadline = time.monotonic() + 15
    total, concurrency = 300, 8

    async def worker(lb: httpx.AsyncClient) -> None:
        nonlocal completed_at_kill
        while len(statuses) < total and time.monotonic() < deadline:
            try:
                response = await lb.get(PAGE)
                statuses.append(response.status_code)
            except httpx.TransportError:
                # nginx had passed on the victim's headers when it died mid-body:
                # it can only cut the connection (recorded as status 0)
                statuses.append(0)
            if len(statuses) == total // 3 and victim.running:
                victim.kill()  # SIGKILL, with requests in flight on it
                completed_at_kill = len(statuses)

    async with httpx.AsyncClient(base_url=cluster.nginx.url, timeout=10) as lb:
        await asyncio.gather(*(worker(lb) for _ in range(concurrency)))

    assert not victim.running
    assert len(statuses) >= total, "the load ran to its end within 15 s"
    # A response the victim had already begun to send when SIGKILL hit cannot be
    # replayed by nginx (an error status, or a body cut short); only those (at most
    # one per connection in flight) may fail, and only at the kill. Every request
    # after that is answered.
    failed = [n for n, status in enumerate(statuses) if status != 200]
    assert len(failed) <= concurrency, {s: statuses.count(s) for s in set(statuses)}
    assert all(
        completed_at_kill - concurrency <= n < completed_at_kill + 2 * concurrency for n in failed
    )
    served_after = sum(contacts_served(r) for r in survivors) - survivors_before
    assert served_after >= len(statuses) - completed_at_kill
    assert f"127.0.0.1:{victim.port}" in cluster.nginx.errors_logged(), "nginx saw it fail"
    assert any(f"127.0.0.1:{victim.port}, " in u for u in cluster.nginx.upstreams_used()), (
        "at least one request was retried on another replica"
    )
