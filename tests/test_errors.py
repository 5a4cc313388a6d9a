"""docs/api.md "Errors": bad input touches nothing, upstream failures map to statuses."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from simupstream.app import Failure
from tests.conftest import Service, Sim, StartService
from tests.support.procs import RedisServer, free_port
from tests.support.servers import InProcessServer


class TestBadInstance:
    @pytest.mark.parametrize(
        "query",
        [
            "",
            "per_page=5",
            "instance=",
            "instance=Acme",
            "instance=-acme",
            "instance=ac%20me",
            "instance=acme%2F..%2Fglobex",
            "instance=" + "a" * 64,
            "instance=acme&instance=globex",
        ],
    )
    async def test_is_422_and_touches_neither_redis_nor_upstream(
        self, service: Service, sim: Sim, redis_server: RedisServer, query: str
    ) -> None:
        redis_server.reset_stats()
        response = await service.get(f"/contacts?{query}")

        assert response.status_code == 422
        assert "detail" in response.json()
        assert sim.stats()["calls"] == {"contacts": 0, "customers": 0, "users": 0}
        commands = redis_server.command_counts()
        assert not set(commands) - {"config|resetstat", "info"}, commands

    async def test_longest_valid_name_is_accepted(self, service: Service) -> None:
        response = await service.get("/contacts?instance=a" + "b" * 62 + "&per_page=1")

        assert response.status_code == 200


class TestInvalidIdsFromUpstream:
    async def test_are_never_looked_up_and_give_null(
        self, service: Service, sim: Sim, redis_server: RedisServer, caplog
    ) -> None:
        caplog.set_level(logging.WARNING)
        response = await service.get("/contacts?instance=acme&per_page=40&badids=1")
        await service.settle()

        body = response.json()
        assert response.status_code == 200
        bad = [
            c
            for c in body["data"]
            if isinstance(c["customerId"], str)
            and (
                c["customerId"] in (".", "..")
                or "/" in c["customerId"]
                or " " in c["customerId"]
                or len(c["customerId"]) > 64
            )
        ]
        assert bad, "the simulated page carries malformed ids"
        assert all(c["customer"] is None for c in bad)
        requested = sim.state.last_query["customers"]
        for contact in bad:
            assert f",{contact['customerId']}," not in f",{requested},"
        keys = [k.decode() for k in redis_server.client().scan_iter(count=1000)]
        assert keys
        assert all("/" not in k and " " not in k and ":..:" not in k for k in keys)
        assert any("contacts.invalid_ids" in r.getMessage() for r in caplog.records)


class TestWhatsappFailures:
    @pytest.mark.parametrize("status", [400, 401, 403, 404, 429])
    async def test_4xx_reaches_the_caller_with_its_body(
        self, service: Service, sim: Sim, status: int
    ) -> None:
        sim.state.fail["contacts"] = Failure(status=status, body='{"error":"nope","code":7}')
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == status
        assert response.json() == {"error": "nope", "code": 7}

    async def test_bad_credentials_are_the_upstreams_401(
        self, start_service: StartService, sim: Sim
    ) -> None:
        service = await start_service(crm_api_token=None)  # the caller's credential reads the CRM
        sim.state.token = "s3cret"
        denied = await service.get("/contacts?instance=acme")
        allowed = await service.get(
            "/contacts?instance=acme&per_page=2", headers={"authorization": "Bearer s3cret"}
        )

        assert denied.status_code == 401
        assert denied.json() == {"detail": "unauthorized"}
        assert allowed.status_code == 200
        assert allowed.json()["data"][0]["customer"] is not None

    async def test_unknown_instance_is_the_upstreams_404(self, service: Service) -> None:
        response = await service.get("/contacts?instance=unknown-co")

        assert response.status_code == 404
        assert response.json() == {"detail": "unknown instance"}

    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_5xx_is_502_with_detail(self, service: Service, sim: Sim, status: int) -> None:
        sim.state.fail["contacts"] = Failure(status=status)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 502
        assert "detail" in response.json()

    async def test_unreachable_is_502(self, start_service: StartService) -> None:
        service = await start_service(whatsapp_api_url=f"http://127.0.0.1:{free_port()}")
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 502
        assert response.json()["detail"]

    @pytest.mark.parametrize(
        "body", ["not json", "[1, 2]", '{"data": {"a": 1}}', '{"items": []}', '{"data": [1]}']
    )
    async def test_unexpected_body_is_502(self, service: Service, sim: Sim, body: str) -> None:
        sim.state.fail["contacts"] = Failure(status=200, body=body)
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 502
        assert "detail" in response.json()

    async def test_hang_is_504_at_the_deadline(self, start_service: StartService, sim: Sim) -> None:
        service = await start_service(upstream_timeout_seconds=0.5)
        sim.state.fail["contacts"] = Failure(hang=True)
        started = time.monotonic()
        response = await service.get("/contacts?instance=acme")

        assert response.status_code == 504
        assert response.json()["detail"]
        assert 0.45 <= time.monotonic() - started < 3

    async def test_deadline_covers_the_whole_call_not_each_read(
        self, start_service: StartService
    ) -> None:
        trickle = await InProcessServer(_trickling_upstream(chunks=20, every=0.1)).start()
        try:
            service = await start_service(
                whatsapp_api_url=trickle.url, upstream_timeout_seconds=0.5
            )
            started = time.monotonic()
            response = await service.get("/contacts?instance=acme")
            elapsed = time.monotonic() - started
        finally:
            await trickle.stop()

        assert response.status_code == 504
        assert elapsed < 1.8  # each read came within 0.1 s; the body took 2 s


def _trickling_upstream(chunks: int, every: float):
    """An upstream that answers 200 at once but sends its body a few bytes at a time."""

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"data": [', "more_body": True})
        for _ in range(chunks):
            await asyncio.sleep(every)
            await send({"type": "http.response.body", "body": b" ", "more_body": True})
        await send({"type": "http.response.body", "body": b"]}"})

    return app


class TestCrmFailures:
    @pytest.mark.parametrize(
        "failure",
        [Failure(status=500), Failure(status=400), Failure(status=200, body="oops")],
        ids=["5xx", "4xx", "bad-body"],
    )
    async def test_partial_page_is_served_and_nothing_failed_is_cached(
        self, service: Service, sim: Sim, redis_server: RedisServer, failure: Failure
    ) -> None:
        sim.state.fail["customers"] = failure
        response = await service.get("/contacts?instance=acme&per_page=20")
        await service.settle()

        assert response.status_code == 200
        assert response.headers["x-enrichment"] == "partial"
        body = response.json()
        assert all(c["customer"] is None for c in body["data"])
        assert any(c["user"] is not None for c in body["data"]), "users still resolve"
        redis = redis_server.client()
        assert list(redis.scan_iter(match="customer:*")) == []
        assert list(redis.scan_iter(match="user:acme:*")) != []

    async def test_timeout_gives_partial_within_the_deadline(
        self, start_service: StartService, sim: Sim
    ) -> None:
        service = await start_service(upstream_timeout_seconds=0.5)
        sim.state.fail["users"] = Failure(hang=True)
        started = time.monotonic()
        response = await service.get("/contacts?instance=acme&per_page=20")

        assert response.status_code == 200
        assert response.headers["x-enrichment"] == "partial"
        assert all(c["user"] is None for c in response.json()["data"])
        assert any(c["customer"] is not None for c in response.json()["data"])
        assert time.monotonic() - started < 3

    async def test_a_failed_batch_is_fetched_again_next_time(
        self, service: Service, sim: Sim
    ) -> None:
        sim.state.fail["customers"] = Failure(status=503, times=1)
        first = await service.get("/contacts?instance=acme&per_page=20")
        await service.settle()
        second = await service.get("/contacts?instance=acme&per_page=20")

        assert first.headers["x-enrichment"] == "partial"
        assert second.headers["x-enrichment"] == "complete"
        assert sim.stats()["calls"]["customers"] == 2
        assert any(c["customer"] is not None for c in second.json()["data"])


class TestForwardedHeaders:
    async def test_only_authorization_and_request_id_reach_the_upstream(
        self, start_service: StartService, sim: Sim
    ) -> None:
        service = await start_service(crm_api_token=None)  # the caller's credential reads the CRM
        response = await service.get(
            "/contacts?instance=acme&per_page=5",
            headers={
                "authorization": "Bearer caller",
                "cookie": "session=abc",
                "x-forwarded-for": "10.0.0.1",
                "x-forwarded-host": "evil.example",
                "x-request-id": "req-123",
                "x-custom": "1",
            },
        )
        headers = sim.state.last_headers

        assert response.headers["x-request-id"] == "req-123"
        for api in ("contacts", "customers", "users"):
            seen = headers[api]
            assert seen["authorization"] == "Bearer caller"
            assert seen["x-request-id"] == "req-123"
            for name in ("cookie", "x-forwarded-for", "x-forwarded-host", "x-custom"):
                assert name not in seen
            assert seen["host"] == sim.url.removeprefix("http://")

    async def test_crm_gets_its_own_token_when_configured(
        self, start_service: StartService, sim: Sim
    ) -> None:
        service = await start_service(crm_api_token="crm-token")
        await service.get(
            "/contacts?instance=acme&per_page=5", headers={"authorization": "Bearer caller"}
        )

        assert sim.state.last_headers["contacts"]["authorization"] == "Bearer caller"
        assert sim.state.last_headers["customers"]["authorization"] == "Bearer crm-token"
        assert sim.state.last_headers["users"]["authorization"] == "Bearer crm-token"

    async def test_request_id_is_generated_when_absent(self, service: Service, sim: Sim) -> None:
        one = await service.get("/contacts?instance=acme&per_page=2")
        two = await service.get("/contacts?instance=acme&per_page=2")

        assert one.headers["x-request-id"] != two.headers["x-request-id"]
        assert len(one.headers["x-request-id"]) >= 16
        assert sim.state.last_headers["contacts"]["x-request-id"] == two.headers["x-request-id"]

    async def test_errors_carry_the_request_id_too(self, service: Service) -> None:
        response = await service.get("/contacts?instance=BAD", headers={"x-request-id": "r-1"})

        assert response.status_code == 422
        assert response.headers["x-request-id"] == "r-1"
