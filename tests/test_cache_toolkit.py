"""The `Cache` toolkit the original service exposed: JSON values, real Redis, graceful when down."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from app.breaker import CircuitBreaker
from app.cache import Cache
from app.config import Settings
from app.redis_client import build_redis
from tests.support.procs import RedisServer


def make_cache(url: str, prefix: str = "t:", timeout: float = 0.25) -> Cache:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        whatsapp_api_url="http://unused",
        crm_api_url="http://unused",
        redis_url=url,
        redis_timeout_seconds=timeout,
    )
    return Cache(
        build_redis(settings),
        timeout=timeout,
        prefix=prefix,
        breaker=CircuitBreaker(threshold=3, cooldown=60),
    )


@pytest.fixture
async def cache(redis_server: RedisServer) -> AsyncIterator[Cache]:
    cache = make_cache(redis_server.url)
    yield cache
    await cache.close()


class TestWithRedis:
    async def test_set_get_exists_delete_round_trip_json(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        value = {"id": 1, "name": "Olá", "tags": ["a"], "n": None, "x": 1.5}
        assert await cache.set("k1", value)

        assert await cache.get("k1") == value
        assert await cache.exists("k1")
        assert (
            redis_server.client().get("t:k1")
            == b'{"id":1,"name":"Ol\xc3\xa1","tags":["a"],"n":null,"x":1.5}'
        )
        assert redis_server.client().ttl("t:k1") == -1
        assert await cache.delete("k1") == 1
        assert await cache.get("k1") is None
        assert not await cache.exists("k1")

    async def test_set_with_ttl_and_expire(self, cache: Cache, redis_server: RedisServer) -> None:
        await cache.set("k", [1, 2], ttl=100)
        assert 95 <= redis_server.client().ttl("t:k") <= 100

        assert await cache.expire("k", 10)
        assert 5 <= redis_server.client().ttl("t:k") <= 10
        assert not await cache.expire("absent", 10)

    async def test_mset_gives_each_item_its_own_ttl_in_one_pipeline(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        redis_server.reset_stats()
        assert await cache.mset([("a", {"v": 1}, 50), ("b", {"v": 2}, 500), ("c", 3, None)])
        client = redis_server.client()

        assert await cache.mget(["a", "b", "c", "missing"]) == [{"v": 1}, {"v": 2}, 3, None]
        assert 45 <= client.ttl("t:a") <= 50
        assert 495 <= client.ttl("t:b") <= 500
        assert client.ttl("t:c") == -1
        commands = redis_server.command_counts()
        assert commands["set"] == 3
        assert "multi" not in commands

    async def test_mdel_and_clear_touch_only_matching_keys_under_the_prefix(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        await cache.mset([(f"user:acme:{i}", i, 60) for i in range(1200)])
        await cache.mset([("user:other:1", 1, 60), ("x", 1, 60)])
        client.set("user:acme:foreign", b"no prefix")  # another app's key
        redis_server.reset_stats()

        assert await cache.clear("user:acme:*") == 1200
        assert await cache.mdel(["user:other:1", "nope"]) == 1
        assert client.get("t:x") == b"1"
        assert client.get("user:acme:foreign") == b"no prefix"
        assert "keys" not in redis_server.command_counts()
        assert redis_server.command_counts()["scan"] >= 1

    async def test_a_glob_character_in_the_prefix_is_literal(
        self, redis_server: RedisServer
    ) -> None:
        cache = make_cache(redis_server.url, prefix="a*:")
        client = redis_server.client()
        client.set("a*:k1", b"1")
        client.set("ab:k1", b"1")

        assert await cache.clear("k*") == 1
        assert client.exists("ab:k1") == 1
        await cache.close()

    async def test_a_value_that_is_not_json_reads_as_a_miss(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        redis_server.client().set("t:bad", b"{not json")

        assert await cache.get("bad") is None


class TestWithoutRedis:
    async def test_every_call_degrades_quickly_when_redis_is_down(
        self, redis_server: RedisServer
    ) -> None:
        cache = make_cache(redis_server.url)
        redis_server.kill()
        started = time.monotonic()

        assert await cache.get("k") is None
        assert await cache.set("k", 1) is False
        assert await cache.delete("k") == 0
        assert await cache.exists("k") is False
        assert await cache.mget(["a", "b"]) == [None, None]
        assert await cache.mset([("a", 1, 10)]) is False
        assert await cache.mdel(["a"]) == 0
        assert await cache.expire("a", 1) is False
        assert await cache.clear("*") == 0
        assert await cache.health() == "down"
        assert time.monotonic() - started < 2
        await cache.close()

    async def test_a_hung_redis_costs_at_most_the_timeout_per_call(
        self, redis_server: RedisServer
    ) -> None:
        cache = make_cache(redis_server.url, timeout=0.2)
        assert await cache.set("k", 1)
        redis_server.pause()
        try:
            started = time.monotonic()
            assert await cache.get("k") is None
            first = time.monotonic() - started
            for _ in range(5):
                await cache.get("k")
            rest = time.monotonic() - started - first
        finally:
            redis_server.resume()
        await cache.close()

        assert first < 0.2 + 0.5
        assert rest < 0.2 * 3 + 0.5, "the breaker opens after three failures"

    async def test_disabled_cache_never_connects(self) -> None:
        cache = Cache(None, timeout=0.1)

        assert await cache.set("k", 1) is False
        assert await cache.get("k") is None
        assert await cache.health() == "disabled"
        await cache.close()
