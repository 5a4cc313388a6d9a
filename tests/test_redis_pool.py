"""app.redis_client.WarmConnectionPool against a real redis-server: connections are opened in
the background, handed out open, and never lost to a caller cancelled at the wrong moment."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from app.redis_client import WarmConnectionPool, _stale, lean_command
from tests.support.procs import RedisServer, eventually


def pool_for(redis_server: RedisServer, **options: object) -> WarmConnectionPool:
    settings: dict[str, object] = {
        "max_connections": 3,
        "timeout": 2.0,
        "connect_timeout": 2.0,
        "socket_timeout": 0.5,
        **options,
    }
    return WarmConnectionPool.from_url(redis_server.url, **settings)


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


class TestWarmConnectionPool:
    async def test_opens_its_connections_before_anyone_asks_and_never_more_than_the_cap(
        self, redis_server: RedisServer
    ) -> None:
        pool = pool_for(redis_server, max_connections=2, warm=4)
        pool.warm_up()
        await eventually(lambda: len(pool._available_connections) == 2, message="warm")
        await asyncio.sleep(0.1)
        assert len(pool._available_connections) == 2, "the cap holds, whatever `warm` says"
        client = Redis.from_pool(pool)
        assert await client.ping()
        await client.aclose()
        assert not pool._dials, "closing the client closed the pool and its connects"

    async def test_callers_cancelled_while_a_stale_connection_is_dropped_leak_nothing(
        self, redis_server: RedisServer, admin: Redis
    ) -> None:
        pool = pool_for(redis_server)
        client = Redis.from_pool(pool)
        for _ in range(4):
            pool.warm_up()
            await eventually(lambda: pool._has_idle(), message="warm")
            await asyncio.sleep(0.05)
            # the server closes every idle connection (a restart, CLIENT KILL, an idle timeout)
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await asyncio.sleep(0.05)
            for steps in range(1, 6):  # cancelled at every point of the check and the drop
                taking = asyncio.create_task(pool.get_connection())
                for _ in range(steps):
                    await asyncio.sleep(0)
                taking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pool.release(await taking)
            assert pool._in_use_connections == set(), "nobody holds a connection"

        async with asyncio.timeout(2):
            assert await client.set("k", "v")
        await client.aclose()

    async def test_a_wake_up_taken_by_a_cancelled_waiter_is_passed_on(
        self, redis_server: RedisServer
    ) -> None:
        pool = pool_for(redis_server, max_connections=1, warm=1)
        pool.warm_up()
        await eventually(lambda: pool._has_idle(), message="warm")
        held = await pool.get_connection()
        first = asyncio.create_task(pool.get_connection())
        second = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.05)  # both wait
        await pool.release(held)  # wakes the first only...
        first.cancel()  # ...whose deadline ends at that very moment

        started = time.monotonic()
        async with asyncio.timeout(1):
            connection = await second
        assert time.monotonic() - started < 0.5, "the idle connection went to the other waiter"
        await pool.release(connection)
        await pool.disconnect()

    async def test_while_redis_is_down_one_connect_a_second_is_retried_in_the_background(
        self, redis_server: RedisServer
    ) -> None:
        pool = pool_for(redis_server, warm=2)
        redis_server.kill()
        pool.warm_up()
        await eventually(lambda: pool._dial_error is not None, message="connects fail")
        assert pool._redial is not None, "a retry is scheduled, not a storm of connects"
        redis_server.restart()

        await eventually(lambda: pool._has_idle(), timeout=10, message="open again, unasked")
        assert pool._dial_error is None
        await pool.disconnect()
        assert pool._redial is None


async def one_warm_connection(redis_server: RedisServer) -> tuple[WarmConnectionPool, Redis]:
    """A pool of one connection, open, and a client on it."""
    pool = pool_for(redis_server, max_connections=1, warm=1)
    pool.warm_up()
    await eventually(lambda: pool._has_idle(), message="warm")
    return pool, Redis.from_pool(pool)


class TestTheWarmPath:
    """What a warm request's Redis call does: an idle connection taken without a read of its
    socket, one command without redis-py's per-call layers, the connection handed back."""

    async def test_idle_connections_the_server_closed_are_dropped_without_a_read(
        self, redis_server: RedisServer, admin: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pool = pool_for(redis_server, warm=3)
        pool.warm_up()
        await eventually(lambda: len(pool._available_connections) == 3, message="warm")
        killed = list(pool._available_connections)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await eventually(lambda: all(_stale(c) for c in killed), message="closes seen")

        async def no_read(*_: object) -> bool:
            raise AssertionError("an idle connection's state is known without reading it")

        monkeypatch.setattr(AbstractConnection, "can_read", no_read)
        client = Redis.from_pool(pool)
        async with asyncio.timeout(2):
            assert await lean_command(client, "PING") in (b"PONG", "PONG")
        assert not any(c in pool._available_connections for c in killed)
        await client.aclose()

    async def test_a_reply_left_waiting_makes_a_connection_stale(
        self, redis_server: RedisServer
    ) -> None:
        pool = pool_for(redis_server, warm=1)
        pool.warm_up()
        await eventually(lambda: pool._has_idle(), message="warm")
        connection = await pool.get_connection()
        assert _stale(connection) is False
        await connection.send_command("PING")  # and its reply never read
        await eventually(lambda: _stale(connection) is True, message="reply arrived")
        await pool.release(connection)
        taken = await pool.get_connection()
        assert taken is not connection
        await pool.release(taken)
        await pool.disconnect()

    async def test_a_command_cut_short_never_leaves_its_reply_to_the_next(
        self, redis_server: RedisServer
    ) -> None:
        pool, client = await one_warm_connection(redis_server)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await lean_command(client, "BLPOP", "nothing", "0.3")
        async with asyncio.timeout(3):
            assert await lean_command(client, "ECHO", "mine") == b"mine"
        assert not pool._in_use_connections
        await client.aclose()

    async def test_an_error_reply_raises_and_keeps_the_connection(
        self, redis_server: RedisServer
    ) -> None:
        pool, client = await one_warm_connection(redis_server)
        (connection,) = pool._available_connections
        with pytest.raises(ResponseError):
            await lean_command(client, "INCR", "a", "b")
        assert await lean_command(client, "MGET", "x", "y") == [None, None]
        assert pool._available_connections == [connection], "the same connection, reused"
        await client.aclose()
