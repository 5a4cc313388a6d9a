"""A hostile upstream: a raw HTTP/1.1 server on 127.0.0.1 whose every answer a test scripts.

It speaks just enough HTTP to be believed (one request per connection, then
`Connection: close`) and nothing more, so it can send what a real framework
would not: bodies larger than announced, endless chunked streams, gzip bombs,
bytes that are not JSON, answers that never come. It keeps the raw bytes of
every request it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from tests.support.procs import free_port


@dataclass(frozen=True)
class RawRequest:
    raw: bytes  # request line and headers, exactly as received
    target: str

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: bytes) -> bytes | None:
        for line in self.raw.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


Answer = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[None]]


class HostileUpstream:
    """Routes by the last path segment (`contacts`, `customers`, `users`) to a scripted answer.

    Unscripted routes answer like a small healthy upstream: one contact that
    references customer 1 and user 1, and those two objects.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.answers: dict[str, Answer] = {}
        self.requests: list[RawRequest] = []
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> HostileUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def requests_to(self, route: str) -> list[RawRequest]:
        return [r for r in self.requests if r.path.rsplit("/", 1)[-1] == route]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.open_connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("latin-1")
            request = RawRequest(head, target)
            self.requests.append(request)
            route = request.path.rsplit("/", 1)[-1]
            await self.answers.get(route, _healthy)(request, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: what a hostile answer is for
        except asyncio.CancelledError:
            pass  # stop(): ends quietly (asyncio would log a cancelled handler as an error)
        finally:
            self.open_connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)


def head(status: int, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def body(
    content: bytes, status: int = 200, content_type: str = "application/json", **headers: str
) -> Answer:
    """A complete answer with a Content-Length."""

    async def answer(_: RawRequest, writer: asyncio.StreamWriter) -> None:
        extra = [(k.replace("_", "-"), v) for k, v in headers.items()]
        fields = [("Content-Type", content_type), ("Content-Length", str(len(content))), *extra]
        writer.write(head(status, fields) + content)

    return answer


def stream(
    chunks: Callable[[], AsyncIterator[bytes]],
    status: int = 200,
    *,
    length: int | None = None,
    encoding: str | None = None,
) -> Answer:
    """An answer streamed from `chunks`: chunked, or with an announced `length`."""

    async def answer(_: RawRequest, writer: asyncio.StreamWriter) -> None:
        fields = [("Content-Type", "application/json")]
        if encoding:
            fields.append(("Content-Encoding", encoding))
        fields.append(
            ("Content-Length", str(length)) if length else ("Transfer-Encoding", "chunked")
        )
        writer.write(head(status, fields))
        async for chunk in chunks():
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if not length else chunk)
            await writer.drain()
        if not length:
            writer.write(b"0\r\n\r\n")

    return answer


def huge(size: int, status: int = 200) -> Answer:
    """`size` bytes announced and sent: a JSON list of spaces (valid, were it not so large)."""

    async def chunks() -> AsyncIterator[bytes]:
        piece = b" " * 65536
        yield b'{"data": ['
        sent = 10
        while sent + len(piece) + 2 <= size:
            yield piece
            sent += len(piece)
        yield b" " * (size - sent - 2) + b"]}"

    return stream(chunks, status, length=size)


def endless(status: int = 200) -> Answer:
    """A chunked body that never ends (until the client goes away)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"data": ['
        piece = b" " * 65536
        while True:
            yield piece

    return stream(chunks, status)


def gzip_bomb(inflated: int, status: int = 200) -> Answer:
    """A gzip body of about inflated/1000 bytes that inflates to `inflated` bytes of JSON."""
    compressed = _bomb(inflated)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(compressed), 65536):
            yield compressed[start : start + 65536]

    return stream(chunks, status, encoding="gzip")


def compressed(content: bytes, encoding: str, status: int = 200) -> Answer:
    """`content` gzip- or deflate- (zlib-) encoded, as most servers send it."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    data = packer.compress(content) + packer.flush()

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    return stream(chunks, status, length=len(data), encoding=encoding)


def hang() -> Answer:
    """Accepts the request and never answers."""

    async def answer(_: RawRequest, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    return answer


@functools.cache
def _bomb(inflated: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b'{"data": [')]
    block = b" " * (1 << 20)
    for _ in range(inflated // len(block)):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b"]}") + packer.flush())
    return b"".join(parts)


async def _healthy(request: RawRequest, writer: asyncio.StreamWriter) -> None:
    route = request.path.rsplit("/", 1)[-1]
    if route == "contacts":
        content = b'{"data": [{"id": 1, "customerId": 1, "userId": 1}], "total": 1}'
    else:
        content = b'{"data": [{"id": 1, "name": "one"}]}'
    await body(content)(request, writer)
