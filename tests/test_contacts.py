"""GET /contacts against the simulated upstream and a real Redis: what the caller receives."""

from __future__ import annotations

import math

import httpx
import orjson
import pytest

from tests.conftest import Service, Sim


async def upstream_page(sim: Sim, instance: str, query: str) -> dict:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sim.url}/{instance}/contacts?{query}")
    assert response.status_code == 200
    return response.json()


async def crm_object(sim: Sim, instance: str, entity: str, entity_id: object) -> dict | None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sim.url}/{instance}/{entity}s?ids={entity_id}")
    found = response.json()["data"]
    return found[0] if found else None


def server_timing(response: httpx.Response) -> dict[str, float]:
    """`Server-Timing: redis;dur=1.2, crm;dur=50.3` as {"redis": 1.2, "crm": 50.3}."""
    items = response.headers["server-timing"].split(",")
    parts = (item.strip().partition(";dur=") for item in items)
    return {name: float(ms) for name, _, ms in parts}


class TestEnrichedPage:
    async def test_page_is_the_upstream_page_plus_customer_and_user(
        self, service: Service, sim: Sim
    ) -> None:
        expected = await upstream_page(sim, "acme", "page=3&per_page=40")
        response = await service.get("/contacts?instance=acme&page=3&per_page=40")

        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert {k: v for k, v in body.items() if k != "data"} == {
            k: v for k, v in expected.items() if k != "data"
        }
        assert len(body["data"]) == 40
        for got, original in zip(body["data"], expected["data"], strict=True):
            assert {k: v for k, v in got.items() if k not in ("customer", "user")} == original
            assert got["customer"] == (
                await crm_object(sim, "acme", "customer", original["customerId"])
                if original["customerId"] is not None
                else None
            )
            assert got["user"] == (
                await crm_object(sim, "acme", "user", original["userId"])
                if original["userId"] is not None
                else None
            )

    async def test_null_ids_and_ids_the_crm_lacks_give_null(
        self, service: Service, sim: Sim
    ) -> None:
        body = (await service.get("/contacts?instance=acme&per_page=300")).json()
        null_refs = [c for c in body["data"] if c["customerId"] is None]
        missing = [c for c in body["data"] if c["customerId"] is not None and c["customer"] is None]
        missing_users = [c for c in body["data"] if c["userId"] is not None and c["user"] is None]

        assert null_refs
        assert all(c["customer"] is None for c in null_refs)
        assert missing, "the simulated CRM lacks some referenced customers"
        for contact in missing:
            assert await crm_object(sim, "acme", "customer", contact["customerId"]) is None
        assert missing_users
        assert all(c["user"] is None for c in body["data"] if c["userId"] is None)

    async def test_string_and_integer_ids_both_resolve(self, service: Service) -> None:
        body = (await service.get("/contacts?instance=acme&per_page=30")).json()
        by_type = {type(c["customerId"]) for c in body["data"] if c["customer"] is not None}

        assert by_type == {int, str}
        for contact in body["data"]:
            if contact["customer"] is not None:
                assert contact["customer"]["id"] == contact["customerId"]
            if contact["user"] is not None:
                assert contact["user"]["id"] == contact["userId"]

    async def test_values_pass_through_byte_for_byte(self, service: Service, sim: Sim) -> None:
        async with httpx.AsyncClient() as client:
            raw = (await client.get(f"{sim.url}/acme/contacts?per_page=5")).content
        response = await service.get("/contacts?instance=acme&per_page=5")
        original = orjson.loads(raw)["data"][0]

        assert "Olá" in original["lastMessage"]["text"]
        first = response.json()["data"][0]
        assert first["lastMessage"] == original["lastMessage"]
        assert first["score"] == original["score"]
        assert "✓".encode() in response.content  # UTF-8, not \\u escapes

    async def test_every_instance_gets_only_its_own_objects(self, service: Service) -> None:
        for instance in ("acme", "globex", "initech"):
            body = (await service.get(f"/contacts?instance={instance}&per_page=50")).json()
            for contact in body["data"]:
                for entity in ("customer", "user"):
                    if contact[entity] is not None:
                        assert contact[entity]["instance"] == instance

    async def test_query_is_forwarded_unchanged_without_instance(
        self, service: Service, sim: Sim
    ) -> None:
        query = "page=2&search=ana%20maria&per_page=7&tag=a%2Bb&flag&empty="
        response = await service.get(f"/contacts?instance=acme&{query}")

        assert response.status_code == 200
        assert sim.state.last_query["contacts"] == query
        assert response.json()["query"]["search"] == "ana maria"

    async def test_instance_anywhere_in_the_query_is_removed(
        self, service: Service, sim: Sim
    ) -> None:
        response = await service.get("/contacts?per_page=3&instance=acme&page=1")

        assert response.status_code == 200
        assert sim.state.last_query["contacts"] == "per_page=3&page=1"

    async def test_server_timing_tells_which_responses_waited_for_the_crm(
        self, service: Service, sim: Sim
    ) -> None:
        sim.state.latency_ms.update(customers=50)
        cold = await service.get("/contacts?instance=acme&per_page=10")
        await service.settle()
        warm = await service.get("/contacts?instance=acme&per_page=10")

        cold_timing = server_timing(cold)
        warm_timing = server_timing(warm)
        assert cold_timing["crm"] >= 45
        assert cold_timing["redis"] < 45, "the CRM's wait is not counted as Redis's"
        assert "crm" not in warm_timing
        assert 0 < warm_timing["redis"] < 45

    async def test_complete_enrichment_is_announced(self, service: Service) -> None:
        response = await service.get("/contacts?instance=acme&per_page=10")

        assert response.headers["x-enrichment"] == "complete"


class TestCrmBatching:
    async def test_cold_1000_contact_page_calls_crm_once_per_100_unique_ids(
        self, service: Service, sim: Sim
    ) -> None:
        body = (await service.get("/contacts?instance=acme&per_page=1000")).json()
        unique_customers = {str(c["customerId"]) for c in body["data"] if c["customerId"]}
        unique_users = {str(c["userId"]) for c in body["data"] if c["userId"]}
        stats = sim.stats()

        assert len(body["data"]) == 1000
        assert stats["calls"]["customers"] == math.ceil(len(unique_customers) / 100)
        assert stats["calls"]["users"] == math.ceil(len(unique_users) / 100)
        assert stats["ids_requested"]["customers"] == len(unique_customers)
        assert max(stats["batch_sizes"]["customers"]) <= 100

    async def test_batches_run_in_parallel(self, service: Service, sim: Sim) -> None:
        sim.state.latency_ms.update(customers=300, users=300)
        response = await service.get("/contacts?instance=acme&per_page=1000")

        assert response.status_code == 200
        assert sim.stats()["calls"]["customers"] >= 9
        # ten sequential batches would take 3 s; parallel ones take one CRM latency
        assert response.elapsed.total_seconds() < 1.5

    async def test_batch_size_follows_the_setting(self, start_service, sim: Sim) -> None:
        service = await start_service(upstream_batch_size=25)
        await service.get("/contacts?instance=acme&per_page=100")

        sizes = sim.stats()["batch_sizes"]["customers"]
        assert max(sizes) == 25
        assert sum(sizes) == sim.stats()["ids_requested"]["customers"]

    async def test_ids_are_deduplicated_before_the_crm(self, service: Service, sim: Sim) -> None:
        response = await service.get("/contacts?instance=acme&per_page=200&dup=1")
        referenced = [c["customerId"] for c in response.json()["data"] if c["customerId"]]

        assert len(referenced) > len(set(referenced))
        stats = sim.stats()
        assert stats["ids_requested"]["customers"] == len(set(map(str, referenced)))
        assert stats["calls"]["customers"] == 1


@pytest.mark.parametrize("per_page", [1, 50])
async def test_page_without_references_needs_no_crm(
    service: Service, sim: Sim, per_page: int
) -> None:
    response = await service.get(f"/contacts?instance=acme&per_page={per_page}&page=999999")

    assert response.status_code == 200
    assert response.json()["data"] == []
    assert sim.stats()["calls"]["customers"] == 0


async def test_openapi_docs_describe_the_api(service: Service) -> None:
    docs = await service.get("/docs")
    schema = (await service.get("/openapi.json")).json()

    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert {"/contacts", "/health", "/metrics", "/cache/{instance}"} <= set(schema["paths"])
    params = {p["name"]: p for p in schema["paths"]["/contacts"]["get"]["parameters"]}
    assert params["instance"]["required"] is True
