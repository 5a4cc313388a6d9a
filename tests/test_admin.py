"""The `/cache` endpoints (docs/api.md): bearer `ADMIN_TOKEN`, invalidation, clearing, stats.

Against a real Redis shared with keys that are not the service's, as a
production Redis may be (the Node.js service's keys, other applications').
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Service, Sim, StartService
from tests.support.procs import RedisServer

TOKEN = "s3cret-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PAGE = "/contacts?instance=acme&per_page=30"
ADMIN_PATHS = [
    ("DELETE", "/cache/acme/customers/1"),
    ("DELETE", "/cache/acme/users/1"),
    ("DELETE", "/cache/acme"),
    ("GET", "/cache/acme/stats"),
]
FOREIGN_KEYS = {
    "other:thing": b"1",
    "customer:acmex:1": b"{}",  # another instance whose name starts the same
    "customer:acme": b"{}",  # no id: not a key the service writes
    "user:acme": b"{}",
    "svc1:customer:acme:1": b"{}",  # a CACHE_KEY_PREFIX'd deployment in the same Redis
    "lease:customer:acme:1": b"x",
    "xcustomer:acme:1": b"{}",
}


@pytest.fixture
async def admin(start_service: StartService) -> Service:
    return await start_service(admin_token=TOKEN)


async def request(
    service: Service, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await service.http.request(method, path, headers=headers)


def keys(redis_server: RedisServer, match: str = "*") -> set[str]:
    return {k.decode() for k in redis_server.client().scan_iter(match=match, count=1000)}


async def warm(service: Service, path: str = PAGE) -> dict[str, object]:
    response = await service.get(path)
    assert response.status_code == 200
    await service.settle()
    body: dict[str, object] = response.json()
    return body


WRONG_AUTHORIZATIONS = [
    f"Bearer {TOKEN}x",
    f"Bearer {TOKEN[:-1]}",
    "Bearer",
    TOKEN,
    f"Basic {TOKEN}",
    f"Token {TOKEN}",
    "Bearer s3cret-admin-tokem",
]
BAD_PATHS = [
    "/cache/Acme",
    "/cache/-acme",
    "/cache/" + "a" * 64,
    "/cache/ac%2Ame",  # a glob character
    "/cache/acme%3A1",
    "/cache/acme/customers/%2E%2E",
    "/cache/acme/customers/%2E",
    "/cache/acme/customers/a%20b",
    "/cache/acme/customers/" + "x" * 65,
    "/cache/acme/orders/1",
    "/cache/Acme/users/1",
]


class TestAccess:
    async def test_every_cache_path_is_404_when_admin_token_is_unset(
        self, service: Service
    ) -> None:
        for method, path in [*ADMIN_PATHS, ("DELETE", "/cache/BAD..")]:
            for headers in ({}, AUTH):
                response = await request(service, method, path, headers=headers)
                assert response.status_code == 404, (method, path, headers)
                assert response.json() == {"detail": "not found"}

    async def test_no_token_is_401_with_a_bearer_challenge(self, admin: Service) -> None:
        for method, path in ADMIN_PATHS:
            response = await request(admin, method, path)

            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"detail": "missing or invalid bearer token"}

    async def test_a_wrong_token_is_401(self, admin: Service, redis_server: RedisServer) -> None:
        redis_server.client().set("customer:acme:1", b"{}")
        for authorization in WRONG_AUTHORIZATIONS:
            response = await admin.http.delete(
                "/cache/acme/customers/1", headers={"authorization": authorization}
            )

            assert response.status_code == 401, authorization
            assert response.headers["www-authenticate"] == "Bearer"
        assert redis_server.client().exists("customer:acme:1") == 1

    async def test_the_scheme_is_case_insensitive(self, admin: Service) -> None:
        response = await admin.http.delete(
            "/cache/acme/customers/1", headers={"authorization": f"bearer {TOKEN}"}
        )
        assert response.status_code == 204

    async def test_without_the_token_a_bad_path_is_401_not_422(self, admin: Service) -> None:
        response = await admin.http.delete("/cache/NOT_VALID")
        assert response.status_code == 401, "nothing about the paths leaks before auth"

    async def test_a_bad_instance_or_id_is_422_and_touches_no_key(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        redis_server.reset_stats()
        for path in BAD_PATHS:
            response = await admin.http.delete(path, headers=AUTH)
            assert response.status_code == 422, path
            assert "detail" in response.json()
        stats = await admin.get("/cache/ACME/stats", headers=AUTH)
        commands = redis_server.command_counts()
        commands.pop("config|resetstat", None)

        assert stats.status_code == 422
        assert commands == {}, "Redis was not touched"


class TestInvalidateOne:
    async def test_deleting_a_customer_drops_its_key_and_only_it_is_fetched_again(
        self, admin: Service, sim: Sim, redis_server: RedisServer
    ) -> None:
        before = await warm(admin)
        cached = keys(redis_server)
        sim.state.reset()

        response = await admin.http.delete("/cache/acme/customers/5", headers=AUTH)
        after = await admin.get(PAGE)
        await admin.settle()
        stats = sim.state.stats(per_id=True)

        assert response.status_code == 204
        assert response.content == b""
        assert keys(redis_server) == cached, "the key is back, and only it was ever missing"
        assert stats["calls"] == {"contacts": 1, "customers": 1, "users": 0}
        assert stats["fetches_per_id"]["customers"] == {"acme:5": 1}
        assert after.json() == before

    async def test_the_key_is_gone_until_the_next_request(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        await warm(admin)
        assert redis_server.client().exists("user:acme:3") == 1

        response = await admin.http.delete("/cache/acme/users/3", headers=AUTH)

        assert response.status_code == 204
        assert redis_server.client().exists("user:acme:3") == 0
        assert redis_server.client().exists("user:acme:4") == 1

    async def test_string_ids_and_uncached_ids_are_fine(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        await warm(admin)
        assert redis_server.client().exists("customer:acme:cus_3") == 1

        string_id = await admin.http.delete("/cache/acme/customers/cus_3", headers=AUTH)
        never_cached = await admin.http.delete("/cache/acme/customers/999999", headers=AUTH)

        assert (string_id.status_code, never_cached.status_code) == (204, 204)
        assert redis_server.client().exists("customer:acme:cus_3") == 0

    async def test_a_prefixed_deployment_deletes_its_own_key_only(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        redis_server.client().set("customer:acme:1", b"{}")
        service = await start_service(admin_token=TOKEN, cache_key_prefix="svc1:")
        await warm(service)
        assert redis_server.client().exists("svc1:customer:acme:1") == 1

        await service.http.delete("/cache/acme/customers/1", headers=AUTH)

        assert redis_server.client().exists("svc1:customer:acme:1") == 0
        assert redis_server.client().get("customer:acme:1") == b"{}"


class TestClearInstance:
    async def test_clearing_deletes_exactly_the_instances_keys_and_says_how_many(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        await warm(admin)
        await warm(admin, "/contacts?instance=globex&per_page=30")
        redis = redis_server.client()
        redis.mset(FOREIGN_KEYS)
        acme = keys(redis_server, "customer:acme:*") | keys(redis_server, "user:acme:*")
        others = keys(redis_server) - acme

        response = await admin.http.delete("/cache/acme", headers=AUTH)

        assert response.status_code == 200
        assert response.json() == {"deleted": len(acme)}
        assert len(acme) > 30
        assert keys(redis_server) == others
        assert keys(redis_server, "customer:globex:*")
        for key, value in FOREIGN_KEYS.items():
            assert redis.get(key) == value, key

    async def test_clearing_uses_scan_and_unlink_never_keys(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        await warm(admin)
        redis_server.reset_stats()

        await admin.http.delete("/cache/acme", headers=AUTH)
        commands = redis_server.command_counts()

        assert commands["scan"] >= 2, "one SCAN cursor walk per entity"
        assert commands["unlink"] > 0
        for forbidden in ("keys", "flushdb", "flushall", "del"):
            assert forbidden not in commands

    async def test_a_large_instance_is_cleared_in_bounded_batches(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        redis = redis_server.client()
        redis.mset({f"customer:big:{n}": b"{}" for n in range(2500)})
        redis.mset({f"user:big:{n}": b"{}" for n in range(700)})
        redis.mset({f"customer:bigger:{n}": b"{}" for n in range(300)})
        redis_server.reset_stats()

        response = await admin.http.delete("/cache/big", headers=AUTH)
        commands = redis_server.command_counts()

        assert response.json() == {"deleted": 3200}
        assert commands["scan"] > 2, "the keyspace is walked in several SCAN calls"
        assert commands["unlink"] == 3200
        assert len(keys(redis_server, "customer:bigger:*")) == 300

    async def test_the_next_request_after_clearing_fetches_everything_again(
        self, admin: Service, sim: Sim
    ) -> None:
        await warm(admin)
        sim.state.reset()

        await admin.http.delete("/cache/acme", headers=AUTH)
        await admin.get(PAGE)

        assert sim.stats()["calls"] == {"contacts": 1, "customers": 1, "users": 1}

    async def test_a_prefixed_deployment_clears_only_its_prefixed_keys(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        unprefixed = await start_service()
        prefixed = await start_service(admin_token=TOKEN, cache_key_prefix="svc1:")
        await warm(unprefixed)
        await warm(prefixed)
        theirs = keys(redis_server, "customer:acme:*")
        ours = keys(redis_server, "svc1:*")

        response = await prefixed.http.delete("/cache/acme", headers=AUTH)

        assert response.json() == {"deleted": len(ours)}
        assert keys(redis_server, "svc1:*") == set()
        assert keys(redis_server, "customer:acme:*") == theirs


class TestStats:
    async def test_stats_count_cached_entities_and_this_process_hits_and_misses(
        self, admin: Service, redis_server: RedisServer
    ) -> None:
        body = await warm(admin)
        await admin.get(PAGE)
        redis_server.client().mset(FOREIGN_KEYS)
        data = body["data"]
        assert isinstance(data, list)
        customers = len({c["customerId"] for c in data if c["customerId"] is not None})
        users = len({c["userId"] for c in data if c["userId"] is not None})

        response = await admin.get("/cache/acme/stats", headers=AUTH)
        other = await admin.get("/cache/initech/stats", headers=AUTH)

        assert response.status_code == 200
        assert (
            response.json()
            | {
                "cached": {"customers": customers, "users": users},
                "hits": customers + users,
                "misses": customers + users,
                "hit_ratio": 0.5,
                "redis": "up",
            }
            == response.json()
        )
        assert other.json()["cached"] == {"customers": 0, "users": 0}
        assert (other.json()["hits"], other.json()["misses"]) == (0, 0)


class TestWithoutRedis:
    async def test_admin_writes_are_503_while_redis_is_down(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(admin_token=TOKEN, redis_timeout_seconds=0.25)
        redis_server.kill()

        one = await service.http.delete("/cache/acme/customers/1", headers=AUTH)
        everything = await service.http.delete("/cache/acme", headers=AUTH)
        stats = await service.get("/cache/acme/stats", headers=AUTH)

        assert (one.status_code, everything.status_code) == (503, 503)
        assert "detail" in one.json()
        assert "detail" in everything.json()
        assert stats.status_code == 200
        assert stats.json()["redis"] == "down"
        assert stats.json()["cached"] == {"customers": None, "users": None}

    async def test_admin_writes_are_503_with_use_redis_false(
        self, start_service: StartService
    ) -> None:
        service = await start_service(redis=None, admin_token=TOKEN)

        one = await service.http.delete("/cache/acme/users/1", headers=AUTH)
        everything = await service.http.delete("/cache/acme", headers=AUTH)

        assert (one.status_code, everything.status_code) == (503, 503)
        assert (await service.get("/cache/acme/stats", headers=AUTH)).json()["redis"] == "disabled"
