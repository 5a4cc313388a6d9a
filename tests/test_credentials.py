"""docs/api.md "Credentials and the shared cache": without CRM_API_TOKEN, the caller's credential
reads the CRM, and no caller ever receives what the CRM answered another."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from simupstream.app import SimState
from simupstream.app import create_app as create_sim_app
from tests.conftest import Service, Sim, StartService
from tests.support.procs import RedisServer
from tests.support.servers import InProcessServer

PAGE = "/contacts?instance=acme&per_page=20"
ALICE = {"authorization": "Bearer alice-token"}
MALLORY = {"authorization": "Bearer mallory-token"}
SCOPED_KEY = re.compile(r"^(customer|user):acme:[0-9a-f]{32}:[A-Za-z0-9_.-]+$")


@pytest.fixture
async def crm() -> AsyncIterator[Sim]:
    """A CRM that answers only alice's token (the contacts API, `sim`, answers everyone)."""
    state = SimState()
    state.token = "alice-token"
    server = await InProcessServer(create_sim_app(state)).start()
    yield Sim(server.url, state)
    await server.stop()


@pytest.fixture
async def scoped(start_service: StartService, crm: Sim) -> Service:
    return await start_service(crm_api_url=crm.url, crm_api_token=None, admin_token="admin-secret")


def customers(response_json: dict[str, object]) -> list[object]:
    data = response_json["data"]
    assert isinstance(data, list)
    return [contact["customer"] for contact in data if contact["customerId"] is not None]


def keys(redis_server: RedisServer) -> list[str]:
    return sorted(k.decode() for k in redis_server.client().scan_iter(count=1000))


class TestCallerCredentialMode:
    async def test_a_caller_never_receives_objects_fetched_with_another_callers_credential(
        self, scoped: Service
    ) -> None:
        alice = await scoped.get(PAGE, headers=ALICE)
        await scoped.settle()
        mallory = await scoped.get(PAGE, headers=MALLORY)
        anonymous = await scoped.get(PAGE)

        assert alice.headers["x-enrichment"] == "complete"
        assert any(customers(alice.json()))
        for other in (mallory, anonymous):
            assert other.status_code == 200
            assert other.headers["x-enrichment"] == "partial", "their CRM calls were refused"
            assert not any(customers(other.json())), "nothing of alice's reached them"

    async def test_another_callers_failure_or_absence_never_reaches_a_caller(
        self, scoped: Service, crm: Sim
    ) -> None:
        mallory = await scoped.get(PAGE, headers=MALLORY)
        await scoped.settle()
        alice = await scoped.get(PAGE, headers=ALICE)

        assert mallory.headers["x-enrichment"] == "partial"
        assert alice.headers["x-enrichment"] == "complete"
        assert any(customers(alice.json()))
        assert crm.stats()["calls"]["customers"] == 2, "alice's lookup was her own"

    async def test_keys_carry_a_hash_of_the_credential_never_the_credential(
        self, scoped: Service, redis_server: RedisServer
    ) -> None:
        await scoped.get(PAGE, headers=ALICE)
        await scoped.get(PAGE, headers=MALLORY)
        await scoped.settle()
        stored = keys(redis_server)

        assert stored
        assert all(SCOPED_KEY.match(key) for key in stored), stored[:5]
        assert not any("alice" in key or "mallory" in key for key in stored)
        scopes = {key.split(":")[2] for key in stored}
        assert len(scopes) == 1, "only alice's answers were cached: mallory's all failed"

    async def test_each_caller_hits_its_own_entries_on_every_replica(
        self, start_service: StartService, crm: Sim
    ) -> None:
        first = await start_service(crm_api_url=crm.url, crm_api_token=None)
        second = await start_service(crm_api_url=crm.url, crm_api_token=None)
        await first.get(PAGE, headers=ALICE)
        await first.settle()
        crm.state.reset()
        crm.state.token = "alice-token"

        again = await second.get(PAGE, headers=ALICE)

        assert again.headers["x-enrichment"] == "complete"
        assert crm.stats()["calls"]["customers"] == 0, "the other replica found alice's entries"

    async def test_invalidation_clears_every_callers_entries(
        self, scoped: Service, crm: Sim, redis_server: RedisServer
    ) -> None:
        admin = {"authorization": "Bearer admin-secret"}
        body = (await scoped.get(PAGE, headers=ALICE)).json()
        await scoped.settle()
        customer_id = next(c["customerId"] for c in body["data"] if c["customer"])
        crm.state.token = "mallory-token"  # now only mallory may read the CRM
        await scoped.get(PAGE, headers=MALLORY)
        await scoped.settle()
        assert len({key.split(":")[2] for key in keys(redis_server)}) == 2

        one = await scoped.http.delete(f"/cache/acme/customers/{customer_id}", headers=admin)
        left = keys(redis_server)
        assert one.status_code == 204
        assert not [key for key in left if key.endswith(f":{customer_id}") and "customer" in key]
        assert any(key.startswith("customer:acme:") for key in left), "the other ids stay"

        everything = await scoped.http.delete("/cache/acme", headers=admin)
        assert everything.status_code == 200
        assert everything.json()["deleted"] == len(left)
        assert keys(redis_server) == []


class TestServiceTokenMode:
    async def test_one_cached_object_serves_every_caller_under_the_documented_keys(
        self, start_service: StartService, crm: Sim, redis_server: RedisServer
    ) -> None:
        service = await start_service(crm_api_url=crm.url, crm_api_token="alice-token")
        first = await service.get(PAGE, headers=MALLORY)
        await service.settle()
        second = await service.get(PAGE)

        assert first.headers["x-enrichment"] == "complete"
        assert second.json() == first.json()
        assert crm.stats()["calls"]["customers"] == 1
        stored = keys(redis_server)
        assert stored
        assert all(re.match(r"^(customer|user):acme:[A-Za-z0-9_.-]+$", key) for key in stored)
