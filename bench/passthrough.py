"""The ceiling for any enrichment: fetch the upstream's page of contacts and return it as is.

A raw ASGI app (no framework) on uvicorn with uvloop and httptools, and one
pooled aiohttp session, the fastest Python HTTP client measured here. Same
URL shape as the service: `GET /contacts?instance=<name>&<query>`.

    python -m bench.passthrough --port 8090 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class PassThrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"] == "/health":
            await _respond(send, 200, b'{"status":"ok"}')
            return
        if scope["path"] != "/contacts" or self.session is None:
            await _respond(send, 404, b'{"detail":"not found"}')
            return
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        instance = next((v for k, v in pairs if k == "instance"), "")
        rest = urlencode([(k, v) for k, v in pairs if k != "instance"])
        url = f"{self.upstream}/{instance}/contacts" + (f"?{rest}" if rest else "")
        async with self.session.get(url) as response:
            body = await response.read()
            await _respond(send, response.status, body)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=None),
                    timeout=aiohttp.ClientTimeout(total=10),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(
        PassThrough(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
