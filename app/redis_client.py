"""Builds the Redis client for `REDIS_MODE`: standalone, cluster or sentinel.

Every mode gets the same failure behaviour: `REDIS_TIMEOUT_SECONDS` for
connecting and for each command, and no retries (redis-py's default retries
with backoff would turn a dead Redis into seconds per request; the cache's
circuit breaker decides when to try again instead).
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from app.config import Settings

RedisClient: TypeAlias = "Redis | RedisCluster"


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def build_redis(settings: Settings) -> RedisClient:
    """A client for `settings`; it connects lazily, on its first command."""
    timeouts: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "retry": _no_retry(),
        "health_check_interval": 0,
    }
    if settings.redis_mode == "cluster":
        return RedisCluster.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            **timeouts,
        )
    if settings.redis_mode == "sentinel":
        sentinel = Sentinel(
            settings.sentinel_hosts,
            sentinel_kwargs={
                "socket_timeout": settings.redis_timeout_seconds,
                "socket_connect_timeout": settings.redis_timeout_seconds,
                "retry": _no_retry(),
            },
            **timeouts,
        )
        return sentinel.master_for(settings.redis_sentinel_master, **timeouts)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_seconds,
        **timeouts,
    )
    return Redis(connection_pool=pool)
