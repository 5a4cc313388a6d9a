"""A TCP proxy on loopback that delays what the server sends back: a distant or slow Redis."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.procs import free_port


class DelayProxy:
    """Forwards 127.0.0.1:`port` to `target_port`; every reply reaches the client `delay`
    seconds after the server sent it (in order, pipelining kept), so a command's round trip
    takes `delay` longer. `delay` can be changed while connections are open."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                replies.put_nowait((loop.time() + self.delay, data))

        async def delayed() -> None:
            while True:
                due, data = await replies.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(job()) for job in (upstream, downstream, delayed)]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
