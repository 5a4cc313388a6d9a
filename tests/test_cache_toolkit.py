"""The `Cache` toolkit the original service exposed: JSON values, real Redis, graceful when down."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.client import Pipeline

from app.breaker import CircuitBreaker
from app.cache import LEASE_NOTE, Cache
from app.config import Settings
from app.redis_client import build_redis
from tests.support.procs import RedisServer


def now_ms() -> int:
    return int(time.time() * 1000)


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


@pytest.fixture
async def noscripts_cache(redis_server: RedisServer) -> AsyncIterator[Cache]:
    """A cache whose Redis user may run every command but scripts (an ACL, as on some
    managed services)."""
    redis_server.client().acl_setuser(
        "noscripts", enabled=True, passwords=["+pw"], keys=["*"],
        commands=["+@all", "-@scripting"],
    )  # fmt: skip
    cache = make_cache(f"redis://noscripts:pw@127.0.0.1:{redis_server.port}/0")
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

    async def test_mset_gives_each_item_its_own_ttl_in_one_round_trip(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        assert await cache.mset([("warm-up", 0, 1)])  # loads the script (NOSCRIPT, then EVAL)
        redis_server.reset_stats()
        assert await cache.mset([("a", {"v": 1}, 50), ("b", {"v": 2}, 500), ("c", 3, None)])
        client = redis_server.client()

        assert await cache.mget(["a", "b", "c", "missing"]) == [{"v": 1}, {"v": 2}, 3, None]
        assert 45 <= client.ttl("t:a") <= 50
        assert 495 <= client.ttl("t:b") <= 500
        assert client.ttl("t:c") == -1
        commands = redis_server.command_counts()
        assert commands["evalsha"] == 1, "one script call for the batch"
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


class TestBatchScripts:
    """The page's batch operations: one Lua script call each on a standalone Redis."""

    async def test_leases_go_to_the_first_taker_only(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        client.hset("lease:acme", "customer:held", f"other:{now_ms() + 60_000}")

        taken = await cache.take_leases(
            "lease:acme", ["customer:a", "customer:held", "user:a"], "me", 5000
        )

        assert taken == [True, False, True]
        lease_a = client.hget("lease:acme", "customer:a")
        assert lease_a is not None
        assert lease_a.startswith(b"me:")
        assert now_ms() < int(lease_a.split(b":")[1]) <= now_ms() + 5000, "its deadline"
        assert client.hget(
            "lease:acme",
            "customer:held",
        ).startswith(b"other:")
        assert 4000 < client.pttl("lease:acme") <= 5000, "the hash outlives no lease by much"
        assert await cache.take_leases("lease:acme", ["customer:a"], "again", 5000) == [False]

    async def test_a_lease_never_shortens_the_hash_under_a_longer_one(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        client.hset("lease:acme", "customer:held", f"other:{now_ms() + 60_000}")
        client.pexpire("lease:acme", 60_000)  # another replica's longer lease

        assert await cache.take_leases("lease:acme", ["customer:a"], "me", 5000) == [True]

        assert 55_000 < client.pttl("lease:acme") <= 60_000, "not shortened to mine"

    async def test_a_lease_past_its_deadline_is_taken_over(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        client.hset("lease:acme", "customer:1", f"crashed:{now_ms() - 1}")

        assert await cache.take_leases("lease:acme", ["customer:1"], "me", 5000) == [True]
        assert client.hget("lease:acme", "customer:1").startswith(b"me:")

    async def test_leases_abandoned_in_a_busy_hash_are_swept(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        """A holder that died leaves its fields; the hash of a busy instance never expires,
        so each lease call deletes the sampled fields past their deadline."""
        client = redis_server.client()
        assert await cache.take_leases("lease:acme", ["c:live"], "me", 60_000) == [True]
        client.hset("lease:acme", mapping={f"c:{n}": f"dead:{now_ms() - 1}" for n in range(40)})

        for n in range(40):
            assert await cache.take_leases("lease:acme", [f"u:{n}"], "me", 60_000) == [True]

        fields = set(client.hkeys("lease:acme"))
        assert not {f"c:{n}".encode() for n in range(40)} & fields, "every dead field swept"
        assert {b"~", b"c:live"} | {f"u:{n}".encode() for n in range(40)} <= fields

    async def test_the_lease_hash_is_a_table_from_its_first_call(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        """Redis 7.0 would fill a small hash (a listpack) one field at a time: ~3 ms of Redis
        for the leases of a page of 1,000 contacts, instead of ~0.6 ms."""
        assert await cache.take_leases("lease:acme", ["customer:1"], "me", 5000) == [True]

        client = redis_server.client()
        assert client.object("encoding", "lease:acme") == b"hashtable"
        assert client.hget("lease:acme", "~") == LEASE_NOTE.encode()

    async def test_a_new_hash_takes_every_lease_without_reading_one(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        """No hash: nobody holds anything, so the script sets every field at once."""
        redis_server.reset_stats()
        fields = [f"customer:{n}" for n in range(700)]

        assert await cache.take_leases("lease:acme", fields, "me", 5000) == [True] * 700

        client = redis_server.client()
        values = client.hgetall("lease:acme")
        assert values.pop(b"~") == LEASE_NOTE.encode()
        assert set(values) == {f.encode() for f in fields}
        assert len(set(values.values())) == 1, "one token and deadline for the call"
        token, _, deadline = next(iter(values.values())).partition(b":")
        assert token == b"me"
        assert now_ms() < int(deadline) <= now_ms() + 5000
        assert 4000 < client.pttl("lease:acme") <= 5000
        commands = redis_server.command_counts()
        assert not {"hmget", "hrandfield"} & set(commands), "nothing read"

    async def test_a_write_releases_only_the_leases_still_holding_its_token(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        assert (
            await cache.take_leases("lease:acme", ["c:1", "c:2", "c:3"], "mine", 5000) == [True] * 3
        )
        client = redis_server.client()
        theirs = f"theirs:{now_ms() + 5000}"
        client.hset("lease:acme", "c:2", theirs)  # mine expired and another replica took it

        assert await cache.write_raw(
            [("v:1", b'{"id":1}', 300), ("v:2", b"null", None)],
            release=["c:1", "c:2"],
            token="mine",
            lease_key="lease:acme",
        )

        assert client.get("v:1") == b'{"id":1}'
        assert 295 <= client.ttl("v:1") <= 300
        assert client.get("v:2") == b"null"
        assert client.ttl("v:2") == -1
        assert client.hexists("lease:acme", "c:1") == 0
        assert client.hget("lease:acme", "c:2") == theirs.encode()
        assert client.hexists("lease:acme", "c:3") == 1, "not released: not asked to"

        assert await cache.write_raw([], release=["c:3"], token="mine", lease_key="lease:acme")
        assert client.exists("lease:acme") == 1, "their lease is still in it"
        client.hdel("lease:acme", "c:2")
        assert await cache.take_leases("lease:acme", ["c:4"], "mine", 5000) == [True]
        assert await cache.write_raw([], release=["c:4"], token="mine", lease_key="lease:acme")
        assert client.exists("lease:acme") == 0, "a hash left with its note only is deleted"

    async def test_leased_values_are_read_with_their_ttl_and_lease_in_one_round_trip(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        client.set("v:1", b"1", px=90_000)
        client.hset(
            "lease:acme",
            mapping={"c:2": f"them:{now_ms() + 60_000}", "c:3": f"gone:{now_ms() - 1}"},
        )
        assert await cache.read_leased(["v:0"], "lease:acme", ["c:0"]) == [(None, -2, False)]
        redis_server.reset_stats()

        entries = await cache.read_leased(
            ["v:1", "v:2", "v:3", "v:4"], "lease:acme", ["c:1", "c:2", "c:3", "c:4"]
        )

        assert entries is not None
        (v1, ttl1, leased1), *rest = entries
        assert (v1, leased1) == (b"1", False)
        assert 80_000 < ttl1 <= 90_000
        assert rest == [(None, -2, True), (None, -2, False), (None, -2, False)], (
            "held; past its deadline (given up); none"
        )
        commands = redis_server.command_counts()
        commands.pop("config|resetstat", None)
        assert commands["evalsha"] == 1
        assert commands["hmget"] == 1

    async def test_values_are_read_with_their_remaining_ttl_in_one_round_trip(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        client.set("k:ttl", b"1", px=90_000)
        client.set("k:forever", b"2")
        assert await cache.read_with_ttl(["k:warm-up"]) == [(None, -2)]  # loads the script
        redis_server.reset_stats()

        entries = await cache.read_with_ttl(["k:ttl", "k:absent", "k:forever"])

        assert entries is not None
        (v1, ttl1), absent, forever = entries
        assert (v1, absent, forever) == (b"1", (None, -2), (b"2", -1))
        assert 80_000 < ttl1 <= 90_000
        commands = redis_server.command_counts()
        commands.pop("config|resetstat", None)
        assert commands == {"evalsha": 1, "get": 3, "pttl": 3}

    async def test_large_batches_are_split_into_bounded_script_calls_in_order(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        client.hset("lease:acme", "c:1500", f"other:{now_ms() + 60_000}")
        leases = [f"c:{n}" for n in range(2500)]
        values = [(f"v:{n}", b"%d" % n, 60 + n % 2) for n in range(2500)]
        # Redis learns the four scripts first, so that each call below is one EVALSHA.
        assert await cache.take_leases("lease:w", ["c:w"], "t", 1000) == [True]
        assert await cache.write_raw(
            [("v:warm-up", b"0", 1)], release=["c:w"], token="t", lease_key="lease:w"
        )
        assert await cache.read_with_ttl(["v:warm-up"]) is not None
        assert await cache.read_leased(["v:warm-up"], "lease:w", ["c:w"]) is not None
        redis_server.reset_stats()

        taken = await cache.take_leases("lease:acme", leases, "me", 5000)
        read = await cache.read_leased([key for key, _, _ in values], "lease:acme", leases)
        assert await cache.write_raw(values, release=leases, token="me", lease_key="lease:acme")
        entries = await cache.read_with_ttl([key for key, _, _ in values])

        assert taken == [n != 1500 for n in range(2500)]
        assert read == [(None, -2, True)] * 2500, "in order, every lease held"
        assert entries is not None
        assert [value for value, _ in entries] == [b"%d" % n for n in range(2500)]
        assert all(0 < ttl <= 61_000 for _, ttl in entries)
        assert client.ttl("v:1") == 61
        assert client.ttl("v:2") == 60
        assert client.hkeys("lease:acme") == [b"c:1500"], "only the foreign lease is left"
        commands = redis_server.command_counts()
        # leases: 3 calls; lease reads: 3; values: 3, then lease releases: 3; reads: 3
        assert commands["evalsha"] == 15, "calls of at most 1,000 keys each"
        assert "eval" not in commands

    async def test_a_large_write_stores_every_value_then_releases_its_leases(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        leases = [f"c:{n}" for n in range(2500)]
        assert await cache.take_leases("lease:acme", leases, "me", 5000) == [True] * 2500
        client.hset("lease:acme", "c:7", b"theirs:99999999999999")
        values = [(f"v:{n}", b"%d" % n, 60) for n in range(1500)]  # not aligned with leases
        redis_server.reset_stats()

        assert await cache.write_raw(values, release=leases, token="me", lease_key="lease:acme")

        assert client.mget([key for key, _, _ in values]) == [v for _, v, _ in values]
        assert set(client.hkeys("lease:acme")) == {b"~", b"c:7"}
        commands = redis_server.command_counts()
        assert commands["evalsha"] == 2 + 3, "values in 2 calls, then leases in 3"

    async def test_one_refused_item_does_not_stop_the_others(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        assert await cache.take_leases("lease:acme", ["c:a"], "me", 5000) == [True]

        stored = await cache.write_raw(
            [("v:1", b"1", 60), ("v:bad", b"2", 0), ("v:3", b"3", 60)],
            release=["c:a"],
            token="me",
            lease_key="lease:acme",
        )

        assert stored is False, "Redis refused EX 0: the call says so"
        assert client.get("v:1") == b"1"
        assert client.get("v:3") == b"3", "the item after the refused one is still stored"
        assert client.exists("v:bad") == 0
        assert client.exists("lease:acme") == 0, "the lease is released all the same"
        assert cache.breaker.allow()

    async def test_a_large_batch_goes_out_in_one_pipeline_and_a_refusal_stops_nothing(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        client = redis_server.client()
        leases = [f"c:{n}" for n in range(1500)]
        assert await cache.take_leases("lease:acme", leases, "me", 5000) == [True] * 1500
        values = [(f"v:{n}", b"%d" % n, 0 if n == 1200 else 60) for n in range(2500)]
        before = int(client.info("stats")["total_connections_received"])

        stored = await cache.write_raw(values, release=leases, token="me", lease_key="lease:acme")

        assert stored is False, "Redis refused EX 0 in the second call: the call says so"
        assert client.exists("v:1200") == 0
        kept = [key for key, _, _ in values if key != "v:1200"]
        assert client.exists(*kept) == 2499, "the calls around the refused one all ran"
        assert client.keys("lease:*") == [], "the leases are released all the same"
        assert int(client.info("stats")["total_connections_received"]) == before, (
            "one pooled connection: a large batch does not take one per call"
        )

    async def test_scripts_flushed_from_redis_are_loaded_again(
        self, cache: Cache, redis_server: RedisServer
    ) -> None:
        assert await cache.take_leases("lease:acme", ["c:x"], "t", 5000) == [True]
        redis_server.client().script_flush()  # what a restart or a failover also does
        redis_server.reset_stats()

        assert await cache.write_raw(
            [("v:x", b"1", 60)], release=["c:x"], token="t", lease_key="lease:acme"
        )

        assert redis_server.client().get("v:x") == b"1"
        assert redis_server.client().exists("lease:acme") == 0
        commands = redis_server.command_counts()
        assert commands["evalsha"] == 1, "NOSCRIPT"
        assert commands["eval"] == 1, "the script comes along once, no SCRIPT LOAD round trip"
        assert "script|load" not in commands

    async def test_where_scripts_are_denied_the_batches_fall_back_to_pipelines(
        self, noscripts_cache: Cache, redis_server: RedisServer
    ) -> None:
        cache = noscripts_cache
        admin = redis_server.client()
        admin.hset("lease:acme", "c:gone", f"crashed:{now_ms() - 1}")
        admin.hset("lease:acme", "c:theirs", f"them:{now_ms() + 60_000}")
        admin.pexpire("lease:acme", 60_000)

        taken = await cache.take_leases(
            "lease:acme", ["c:a", "c:b", "c:gone", "c:theirs"], "me", 5000
        )
        assert await cache.write_raw(
            [("v:a", b"1", 60)], release=["c:a"], token="me", lease_key="lease:acme"
        )
        entries = await cache.read_with_ttl(["v:a", "v:absent"])
        leased = await cache.read_leased(
            ["v:a", "v:b", "v:theirs"], "lease:acme", ["c:a", "c:b", "c:theirs"]
        )

        assert taken == [True, True, True, False], "a lease past its deadline is taken over"
        assert admin.hget("lease:acme", "c:gone").startswith(b"me:")
        assert entries is not None
        assert entries[0][0] == b"1"
        assert entries[1] == (None, -2)
        assert leased is not None
        assert [(value, held) for value, _, held in leased] == [
            (b"1", False),
            (None, True),
            (None, True),
        ]
        assert admin.get("v:a") == b"1"
        assert admin.hexists("lease:acme", "c:a") == 0
        assert admin.hget("lease:acme", "c:b").startswith(b"me:")
        assert 55_000 < admin.pttl("lease:acme") <= 60_000, "not shortened below their lease"
        assert cache.breaker.allow(), "a denied script is not an outage"

    async def test_without_scripts_a_new_lease_hash_expires_with_its_lease(
        self, noscripts_cache: Cache, redis_server: RedisServer
    ) -> None:
        admin = redis_server.client()

        assert await noscripts_cache.take_leases("lease:new", ["c:1"], "me", 5000) == [True]
        admin.pexpire("lease:new", 1000)  # another replica's shorter lease, then mine:
        assert await noscripts_cache.take_leases("lease:new", ["c:2"], "me", 5000) == [True]

        assert 4000 < admin.pttl("lease:new") <= 5000, "extended to the newest lease"

    async def test_without_scripts_a_lease_call_is_one_round_trip_unless_one_is_dead(
        self, noscripts_cache: Cache, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        client = noscripts_cache._client
        assert client is not None
        pipelines = 0
        real = client.pipeline

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal pipelines
            pipelines += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(client, "pipeline", counted)
        rounds = []
        for n in range(4):
            pipelines = 0
            assert await noscripts_cache.take_leases("lease:acme", [f"c:{n}"], "me", 5000) == [True]
            rounds.append(pipelines)
        redis_server.client().hset("lease:acme", "c:dead", f"crashed:{now_ms() - 1}")
        pipelines = 0
        assert await noscripts_cache.take_leases("lease:acme", ["c:dead"], "me", 5000) == [True]

        assert rounds == [1, 1, 1, 1], "a new field into a live hash: one round trip"
        assert pipelines == 2, "a dead field is taken over in a second one"

    async def test_without_scripts_a_release_spares_a_lease_taken_over(
        self, noscripts_cache: Cache, redis_server: RedisServer
    ) -> None:
        admin = redis_server.client()
        assert await noscripts_cache.take_leases("lease:acme", ["c:1", "c:2"], "me", 5000) == [
            True,
            True,
        ]
        theirs = f"them:{now_ms() + 60_000}"
        admin.hset("lease:acme", "c:2", theirs)  # mine expired: another replica took it over

        assert await noscripts_cache.write_raw(
            [("v:1", b"1", 60)], release=["c:1", "c:2"], token="me", lease_key="lease:acme"
        )

        assert admin.get("v:1") == b"1"
        assert admin.hexists("lease:acme", "c:1") == 0
        assert admin.hget("lease:acme", "c:2") == theirs.encode()

    async def test_without_scripts_no_command_carries_more_than_1000_fields(
        self, noscripts_cache: Cache, redis_server: RedisServer
    ) -> None:
        fields = [f"c:{n}" for n in range(2500)]
        redis_server.reset_stats()

        assert await noscripts_cache.take_leases("lease:acme", fields, "me", 5000) == [True] * 2500
        read = await noscripts_cache.read_leased(
            [f"v:{n}" for n in range(2500)], "lease:acme", fields
        )
        assert await noscripts_cache.write_raw(
            [], release=fields, token="me", lease_key="lease:acme"
        )

        assert read == [(None, -2, True)] * 2500
        assert redis_server.client().exists("lease:acme") == 0, "every lease released"
        commands = redis_server.command_counts()
        assert commands["hmget"] == 3 * 3, "3 slices each: take, read, release"
        assert commands["hdel"] == 3

    async def test_without_scripts_or_expiry_options_the_hash_still_expires(
        self, noscripts_cache: Cache, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Before Redis 7, PEXPIRE has no NX or GT: the hash gets its TTL all the same, and
        only the first lease call pays a second round trip to find that out."""
        real = Pipeline.pexpire
        refused = 0

        def before_redis_7(self: Pipeline, name: str, time: int, **options: bool) -> Any:
            nonlocal refused
            if any(options.values()):  # as Redis 6 answers an option it does not know
                refused += 1
                return self.execute_command("PEXPIRE", name, time, "UNKNOWN-OPTION")
            return real(self, name, time)

        real_execute = Pipeline.execute
        round_trips = 0

        async def counted(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
            nonlocal round_trips
            round_trips += 1
            return await real_execute(self, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "pexpire", before_redis_7)
        monkeypatch.setattr(Pipeline, "execute", counted)
        admin = redis_server.client()

        assert await noscripts_cache.take_leases("lease:acme", ["c:1"], "me", 1000) == [True]
        assert 0 < admin.pttl("lease:acme") <= 1000
        assert (round_trips, refused) == (2, 2), "refused once (NX and GT), then set"
        assert await noscripts_cache.take_leases("lease:acme", ["c:2"], "me", 5000) == [True]
        assert 4000 < admin.pttl("lease:acme") <= 5000, "lengthened to the newest lease"
        assert (round_trips, refused) == (3, 2), "one round trip, no option asked again"

    async def test_only_a_refused_expiry_option_is_remembered(
        self, noscripts_cache: Cache, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Any other error of `PEXPIRE ... NX` (READONLY in a failover) passes: the next
        lease call asks NX and GT again, rather than a plain PEXPIRE for good."""
        real = Pipeline.pexpire
        failing = True
        asked = 0

        def flaky(self: Pipeline, name: str, time: int, **options: bool) -> Any:
            nonlocal asked
            if any(options.values()):
                asked += 1
                if failing:  # an error that is no refusal: "value is not an integer"
                    return self.execute_command("PEXPIRE", name, "not-a-number")
            return real(self, name, time, **options)

        monkeypatch.setattr(Pipeline, "pexpire", flaky)
        admin = redis_server.client()

        assert await noscripts_cache.take_leases("lease:acme", ["c:1"], "me", 1000) == [True]
        failing = False
        before = asked
        assert await noscripts_cache.take_leases("lease:acme", ["c:2"], "me", 5000) == [True]

        assert asked - before == 2, "NX and GT asked again"
        assert 4000 < admin.pttl("lease:acme") <= 5000


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
