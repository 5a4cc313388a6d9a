"""Real HTTP servers inside the test's event loop: uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from tests.support.procs import free_port


class InProcessServer:
    """Serves an ASGI app with uvicorn on 127.0.0.1 until `stop()`; a real socket, real HTTP."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            loop="none",
            http="httptools",
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def has_client(self, port: int) -> bool:
        """Whether the server still holds the connection from this client port (a closed one
        leaves on `connection_lost`)."""
        return any(
            getattr(conn, "client", None) == ("127.0.0.1", port)
            for conn in self.server.server_state.connections
        )

    async def start(self) -> InProcessServer:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("server exited before starting")
            await asyncio.sleep(0.005)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)
