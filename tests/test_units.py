"""Unit tests: the breaker, the input rules, exact JSON, query forwarding, the upstream client."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx
from redis._parsers import Encoder
from redis.asyncio.connection import Connection as RedisConnection
from redis.connection import PythonRespSerializer

from app import jsonutil
from app.breaker import CircuitBreaker, State
from app.config import Settings
from app.errors import BadGateway, GatewayTimeout, UpstreamRejected
from app.routes.contacts import AmbiguousInstance, _forwarded_query
from app.upstream import CrmError, Upstream
from app.validation import is_valid_instance, normalize_id


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestCircuitBreaker:
    def test_opens_after_the_threshold_of_consecutive_failures(self) -> None:
        breaker = CircuitBreaker(threshold=3, cooldown=5, clock=FakeClock())
        for _ in range(2):
            assert breaker.allow()
            breaker.failure(ConnectionError("x"))
        assert breaker.state is State.CLOSED
        breaker.failure(ConnectionError("x"))

        assert breaker.state is State.OPEN
        assert not breaker.allow()

    def test_a_success_resets_the_count(self) -> None:
        breaker = CircuitBreaker(threshold=2, cooldown=5, clock=FakeClock())
        breaker.failure(ConnectionError("x"))
        breaker.success()
        breaker.failure(ConnectionError("x"))

        assert breaker.state is State.CLOSED

    def test_lets_one_probe_through_after_the_cooldown(self) -> None:
        clock = FakeClock()
        breaker = CircuitBreaker(threshold=1, cooldown=5, clock=clock)
        breaker.failure(ConnectionError("x"))
        clock.now += 4.9
        assert not breaker.allow()
        clock.now += 0.2

        assert breaker.allow()
        assert breaker.state is State.HALF_OPEN
        assert not breaker.allow(), "only one probe at a time"
        breaker.success()
        assert breaker.state is State.CLOSED
        assert breaker.allow()

    def test_a_failed_probe_opens_it_again(self) -> None:
        clock = FakeClock()
        breaker = CircuitBreaker(threshold=3, cooldown=5, clock=clock)
        for _ in range(3):
            breaker.failure(ConnectionError("x"))
        clock.now += 6
        assert breaker.allow()
        breaker.failure(TimeoutError())

        assert breaker.state is State.OPEN
        assert not breaker.allow()

    def test_a_cancelled_probe_lets_the_next_caller_probe(self) -> None:
        clock = FakeClock()
        breaker = CircuitBreaker(threshold=1, cooldown=1, clock=clock)
        breaker.failure(ConnectionError("x"))
        clock.now += 2
        assert breaker.allow()
        breaker.abandon()

        assert breaker.allow()


class TestInputRules:
    @pytest.mark.parametrize("name", ["acme", "a", "0", "a-b_c", "x" * 63, "9lives"])
    def test_valid_instances(self, name: str) -> None:
        assert is_valid_instance(name)

    @pytest.mark.parametrize(
        "name", ["", "Acme", "-a", "_a", "a b", "a/b", "a.b", "x" * 64, "a\n", "ä"]
    )
    def test_invalid_instances(self, name: str) -> None:
        assert not is_valid_instance(name)

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [(17, "17"), ("17", "17"), ("cus_13", "cus_13"), ("a.b-c_d", "a.b-c_d"), (-3, "-3")],
    )
    def test_ids_in_keys_and_urls(self, raw: object, expected: str) -> None:
        assert normalize_id(raw) == expected

    @pytest.mark.parametrize(
        "raw",
        [".", "..", "", "a b", "a/b", "../etc", "a:b", "a,b", "x" * 65, "ü", True, 1.5, [1], {}],
    )
    def test_ids_never_looked_up(self, raw: object) -> None:
        assert normalize_id(raw) is None


class TestRedisCommandPacking:
    """`app.redis_client` packs commands with hiredis: the bytes must be redis-py's own."""

    @pytest.mark.parametrize(
        "args",
        [
            ("MGET", "customer:acme:1", "user:acme:2"),
            ("SET", "k", b"v\r\n", "EX", 300),
            ("EVALSHA", "0" * 40, 2, "k1", "k2", "token", 10_000),
            ("CONFIG RESETSTAT",),
            ("SET", bytearray(b"k"), memoryview(b"v")),
            ("SET", "é", "ü", "PX", 0.1),
            ("ZADD", "z", 1e20, "a", 1 / 3, "b", -0.0, "c"),  # floats written as repr() writes them
        ],
    )
    def test_same_bytes_as_redis_py(self, args: tuple[object, ...]) -> None:
        import app.redis_client

        assert RedisConnection.pack_command.__module__ == app.redis_client.__name__
        ours = b"".join(RedisConnection().pack_command(*args))  # type: ignore[arg-type]
        theirs = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)

        assert ours == b"".join(theirs.pack(*args))


class TestExactJson:
    def test_integers_beyond_64_bits_keep_their_value(self) -> None:
        raw = b'{"big": 123456789012345678901234567890, "neg": -9223372036854775809}'

        assert jsonutil.is_exotic(raw)
        value = jsonutil.loads(raw)
        assert value["big"] == 123456789012345678901234567890
        assert (
            jsonutil.dumps(value)
            == b'{"big":123456789012345678901234567890,"neg":-9223372036854775809}'
        )

    def test_ordinary_bodies_take_the_fast_path(self) -> None:
        assert not jsonutil.is_exotic(b'{"id": 18446744073709551, "x": 1.5}')

    def test_invalid_json_raises_value_error(self) -> None:
        with pytest.raises(ValueError):
            jsonutil.loads(b"{nope")


class TestForwardedQuery:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (b"instance=acme", ""),
            (b"instance=acme&page=2", "page=2"),
            (b"page=2&instance=acme&q=a%20b", "page=2&q=a%20b"),
            (b"q=a+b&x=%2B&flag&e=", "q=a+b&x=%2B&flag&e="),
            (b"inst%61nce=acme&page=1", "page=1"),
        ],
    )
    def test_keeps_everything_but_instance_byte_for_byte(self, raw: bytes, expected: str) -> None:
        assert _forwarded_query(raw) == expected

    def test_a_second_instance_is_refused(self) -> None:
        with pytest.raises(AmbiguousInstance):
            _forwarded_query(b"instance=a&instance=b")


@pytest.fixture
def mock() -> respx.MockRouter:
    with respx.mock(using="httpx", assert_all_called=False) as router:
        yield router


@pytest.fixture
async def upstream() -> Upstream:
    client = httpx.AsyncClient()
    yield Upstream(
        client,
        whatsapp_url="http://wa.test/api/",
        crm_url="http://crm.test",
        crm_token=None,
        timeout=0.3,
    )
    await client.aclose()


class TestUpstreamClient:
    async def test_contacts_url_query_and_headers(
        self, upstream: Upstream, mock: respx.MockRouter
    ) -> None:
        route = mock.get(host="wa.test", path="/api/acme/contacts").mock(
            return_value=httpx.Response(200, json={"data": [{"customerId": 1}], "total": 1})
        )
        page = await upstream.contacts("acme", "page=2&q=a%20b", "Bearer t", "rid-1")

        request = route.calls.last.request
        assert request.url.query == b"page=2&q=a%20b"
        assert request.headers["authorization"] == "Bearer t"
        assert request.headers["x-request-id"] == "rid-1"
        assert page.items == [{"customerId": 1}]
        assert page.body["total"] == 1

    async def test_contacts_4xx_is_passed_on_with_its_body(
        self, upstream: Upstream, mock: respx.MockRouter
    ) -> None:
        mock.get(host="wa.test", path="/api/acme/contacts").mock(
            return_value=httpx.Response(403, json={"why": "forbidden"})
        )
        with pytest.raises(UpstreamRejected) as caught:
            await upstream.contacts("acme", "", None, "r")

        assert caught.value.status_code == 403
        assert caught.value.body == b'{"why":"forbidden"}'

    async def test_contacts_connection_error_is_bad_gateway(
        self, upstream: Upstream, mock: respx.MockRouter
    ) -> None:
        mock.get(host="wa.test", path="/api/acme/contacts").mock(
            side_effect=httpx.ConnectError("x")
        )
        with pytest.raises(BadGateway):
            await upstream.contacts("acme", "", None, "r")

    async def test_contacts_slower_than_the_deadline_is_gateway_timeout(
        self, upstream: Upstream, mock: respx.MockRouter
    ) -> None:
        async def slow(_: httpx.Request) -> httpx.Response:
            await asyncio.sleep(5)
            return httpx.Response(200, json={"data": []})

        mock.get(host="wa.test", path="/api/acme/contacts").mock(side_effect=slow)
        with pytest.raises(GatewayTimeout):
            await asyncio.wait_for(upstream.contacts("acme", "", None, "r"), 2)

    async def test_crm_objects_come_back_as_compact_json_by_id(
        self, upstream: Upstream, mock: respx.MockRouter
    ) -> None:
        route = mock.get(host="crm.test", path="/acme/customers").mock(
            return_value=httpx.Response(
                200, json={"data": [{"id": 1, "n": "a"}, {"id": "x_2", "n": "b"}, {"n": "no id"}]}
            )
        )
        found = await upstream.entities("customer", "acme", ["1", "x_2", "3"], "Bearer c", "r")

        assert route.calls.last.request.url.query == b"ids=1,x_2,3"
        assert found == {"1": b'{"id":1,"n":"a"}', "x_2": b'{"id":"x_2","n":"b"}'}

    @pytest.mark.parametrize(
        "response",
        [httpx.Response(500), httpx.Response(400), httpx.Response(200, text="<html>")],
    )
    async def test_any_crm_failure_is_a_crm_error(
        self, upstream: Upstream, mock: respx.MockRouter, response: httpx.Response
    ) -> None:
        mock.get(host="crm.test", path="/acme/users").mock(return_value=response)
        with pytest.raises(CrmError):
            await upstream.entities("user", "acme", ["1"], None, "r")

    async def test_crm_token_replaces_the_callers_authorization(
        self, mock: respx.MockRouter
    ) -> None:
        route = mock.get(host="crm.test", path="/acme/users").mock(
            return_value=httpx.Response(200, json={"data": []})
        )
        async with httpx.AsyncClient() as client:
            crm = Upstream(
                client, whatsapp_url="http://wa.test", crm_url="http://crm.test",
                crm_token="secret", timeout=1,
            )  # fmt: skip
            await crm.entities("user", "acme", ["1"], "Bearer caller", "r")

        assert route.calls.last.request.headers["authorization"] == "Bearer secret"


class TestSettings:
    def base(self, **values: object) -> dict[str, object]:
        return {"whatsapp_api_url": "http://wa", "crm_api_url": "http://crm", **values}

    def test_defaults_are_the_specs(self) -> None:
        settings = Settings(_env_file=None, **self.base())  # type: ignore[arg-type]

        assert settings.upstream_timeout_seconds == 10
        assert settings.upstream_batch_size == 100
        assert settings.use_redis is True
        assert settings.redis_url == "redis://localhost:6379/0"
        assert settings.redis_mode == "standalone"
        assert settings.redis_sentinel_master == "mymaster"
        assert settings.redis_timeout_seconds == 0.25
        assert settings.cache_ttl_seconds == 300
        assert settings.cache_negative_ttl_seconds == 60
        assert settings.cache_key_prefix == ""
        assert settings.cache_refresh_ahead_seconds == 0
        assert settings.cache_stale_seconds == 0
        assert settings.admin_token is None
        assert (settings.log_level, settings.log_format) == ("info", "json")

    def test_reads_the_environment_names_of_the_spec(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WHATSAPP_API_URL", "http://wa.example/")
        monkeypatch.setenv("CRM_API_URL", "http://crm.example")
        monkeypatch.setenv("USE_REDIS", "false")
        monkeypatch.setenv("REDIS_SENTINELS", "h1:26379,h2:26380")
        monkeypatch.setenv("CRM_API_TOKEN", "s3cr3t-value")
        monkeypatch.setenv("ADMIN_TOKEN", "")
        settings = Settings(_env_file=None)  # type: ignore[call-arg]

        assert settings.whatsapp_api_url == "http://wa.example"
        assert settings.use_redis is False
        assert settings.sentinel_hosts == [("h1", 26379), ("h2", 26380)]
        assert settings.crm_api_token is not None
        assert settings.crm_api_token.get_secret_value() == "s3cr3t-value"
        assert "s3cr3t-value" not in repr(settings)
        assert settings.admin_token is None, "an empty value means unset"

    @pytest.mark.parametrize(
        "values",
        [
            {"whatsapp_api_url": "ftp://x"},
            {"crm_api_url": "http://user:secret@crm"},
            {"redis_url": "http://localhost"},
            {"upstream_batch_size": 101},
            {"redis_mode": "sentinel"},
            {"log_format": "xml"},
        ],
    )
    def test_refuses_bad_values(self, values: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            Settings(_env_file=None, **self.base(**values))  # type: ignore[arg-type]
