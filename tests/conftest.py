"""Fixtures: real redis-server processes, the simulated upstream and the service on real ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from simupstream.app import SimState
from simupstream.app import create_app as create_sim_app
from tests.support.procs import RedisServer
from tests.support.servers import InProcessServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@dataclass
class Sim:
    """The simulated WhatsApp/CRM upstream, served on a real port, with its state at hand."""

    url: str
    state: SimState

    def stats(self) -> dict[str, Any]:
        return self.state.stats()


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    state = SimState()
    server = await InProcessServer(create_sim_app(state)).start()
    yield Sim(server.url, state)
    await server.stop()


@dataclass
class Service:
    """The service on a real port: its URL, an HTTP client to it, and what its lifespan built."""

    url: str
    app: FastAPI
    http: httpx.AsyncClient
    server: InProcessServer

    @property
    def resources(self) -> Any:
        return self.app.state.resources

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.get(path, **kwargs)

    async def settle(self) -> None:
        """Wait for background CRM fetches and cache writes started by earlier requests."""
        await self.resources["resolver"].drain(10)


StartService = Callable[..., Awaitable[Service]]


def settings_for(sim: Sim, redis: RedisServer | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "whatsapp_api_url": sim.url,
        "crm_api_url": sim.url,
        "redis_url": redis.url if redis else "redis://127.0.0.1:1/0",
        "use_redis": redis is not None,
        "log_level": "warning",
        "redis_breaker_cooldown_seconds": 0.5,
        # The recommended mode, in which cached objects are shared under the documented keys
        # (tests/test_credentials.py covers the caller-credential mode).
        "crm_api_token": "service-token",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def start_service(sim: Sim, redis_server: RedisServer) -> AsyncIterator[StartService]:
    """Start the service (overrides are Settings fields); `redis=None` means USE_REDIS=false."""
    running: list[tuple[InProcessServer, httpx.AsyncClient]] = []

    async def start(redis: RedisServer | str | None = "default", **overrides: Any) -> Service:
        target = redis_server if redis == "default" else redis
        assert not isinstance(target, str)
        app = create_app(settings_for(sim, target, **overrides))
        server = await InProcessServer(app).start()
        client = httpx.AsyncClient(base_url=server.url, timeout=30)
        running.append((server, client))
        return Service(server.url, app, client, server)

    yield start
    for server, client in running:
        await client.aclose()
        await server.stop()


@pytest.fixture
async def service(start_service: StartService) -> Service:
    return await start_service()
