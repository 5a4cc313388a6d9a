"""app.http1.Http1Client against a real keep-alive server on loopback: connections reused,
bounded, dropped when they cannot be trusted, and never lost to a cancelled caller.
(tests/test_hostile_upstream.py runs the bodies a hostile upstream sends through it.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.http1 import Head, Http1Client, UpstreamConnectionError

#: Writes the answer to one request (its raw head given); returns False to close after it.
Respond = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Respond:
    async def respond(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + extra
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        return True

    return respond


class KeepAliveServer:
    """Serves requests one after another on each connection, as `respond` says."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> KeepAliveServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                keep = await self.respond(head, writer)
                await writer.drain()
                if not keep:
                    return
        finally:
            self.open -= 1
            writer.close()


StartServer = Callable[[Respond], Awaitable[KeepAliveServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[KeepAliveServer] = []

    async def start(respond: Respond) -> KeepAliveServer:
        servers.append(await KeepAliveServer(respond).start())
        return servers[-1]

    yield start
    for server in servers:
        await server.stop()


async def get(client: Http1Client, url: str) -> tuple[Head, bytes]:
    chunks: list[bytes] = []
    head = await client.get(url, [("accept", "application/json")], lambda _: chunks.append)
    return head, b"".join(chunks)


async def huge_head(_: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
    return True


async def endless_header(_: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
    with contextlib.suppress(ConnectionError):
        for _ in range(10_000):  # 160 MB if nobody stops reading
            writer.write(b"a" * 16_384)
            await writer.drain()
    return False


class TestConnections:
    async def test_one_connection_serves_every_request_in_turn(
        self, start_server: StartServer
    ) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=4)
        for _ in range(5):
            head, body = await get(client, f"{server.url}/x?a=1")
            assert (head.status, body) == (200, b'{"ok":true}')
        assert server.connections == 1
        assert server.requests[0].startswith(b"GET /x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
        await client.aclose()

    async def test_never_more_connections_than_the_cap(self, start_server: StartServer) -> None:
        async def slow(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(0.02)
            return await ok()(head, writer)

        server = await start_server(slow)
        client = Http1Client(max_connections=3)
        answers = await asyncio.gather(*(get(client, server.url) for _ in range(30)))
        assert all(head.status == 200 for head, _ in answers)
        assert server.most_open <= 3
        assert server.connections <= 3, "connections handed from caller to caller, not reopened"
        await client.aclose()

    async def test_the_keep_alive_race_is_retried_once_on_a_new_connection(
        self,
        start_server: StartServer,
    ) -> None:
        async def once(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await ok()(head, writer)
            return False  # closes without saying so: the next request meets a closed socket

        server = await start_server(once)
        client = Http1Client(max_connections=2)
        await get(client, server.url)
        await asyncio.sleep(0.05)
        (idle,) = client._idle[next(iter(client._idle))]
        idle.closed = False  # as if the close had not been seen yet: sent on a dead socket
        head, _ = await get(client, server.url)
        assert head.status == 200
        assert server.connections == 2
        await client.aclose()

    async def test_idle_connections_expire(self, start_server: StartServer) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=2, keepalive_seconds=0.05)
        await get(client, server.url)
        await asyncio.sleep(0.1)
        await get(client, server.url)
        assert server.connections == 2
        await client.aclose()

    async def test_connection_close_is_honoured(self, start_server: StartServer) -> None:
        server = await start_server(ok(extra=b"Connection: close\r\n"))
        client = Http1Client(max_connections=2)
        await get(client, server.url)
        await get(client, server.url)
        assert server.connections == 2
        await client.aclose()

    async def test_a_caller_cancelled_mid_answer_leaks_nothing(
        self, start_server: StartServer
    ) -> None:
        async def stalls(head: bytes, writer: asyncio.StreamWriter) -> bool:
            if len(server.requests) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                await writer.drain()
                await asyncio.sleep(5)
            return await ok()(head, writer)

        server = await start_server(stalls)
        client = Http1Client(max_connections=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await get(client, server.url)
        async with asyncio.timeout(2):
            head, body = await get(client, server.url)
        assert (head.status, body) == (200, b'{"ok":true}'), "not the first answer's rest"
        assert server.connections == 2
        assert client._open == 1
        await client.aclose()
        assert client._open == 0

    async def test_callers_giving_up_at_every_moment_leave_the_pool_whole(
        self, start_server: StartServer
    ) -> None:
        rng = random.Random(13)

        async def jittery(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(rng.choice([0, 0.001, 0.002, 0.003]))
            return await ok()(head, writer)

        server = await start_server(jittery)
        client = Http1Client(max_connections=4)
        other: list[BaseException] = []

        async def one() -> None:
            try:
                async with asyncio.timeout(rng.choice([0.001, 0.002, 0.004, 0.01])):
                    await get(client, server.url)
            except TimeoutError:
                pass
            except BaseException as exc:  # anything but the deadline is a defect
                other.append(exc)

        for _ in range(8):
            await asyncio.gather(*(one() for _ in range(100)))
        assert other == []
        assert not client._waiters
        async with asyncio.timeout(5):
            head, _ = await get(client, server.url)
        assert head.status == 200, "the pool still serves"
        await client.aclose()
        assert client._open == 0, "every connection accounted for"


class TestAnswers:
    async def test_chunked_and_until_close_bodies_arrive_whole(
        self, start_server: StartServer
    ) -> None:
        async def chunked(_: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"[1,", b"2,", b"3]"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            return True

        async def until_close(_: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n[4,")
            await writer.drain()
            writer.write(b"5]")
            return False

        client = Http1Client(max_connections=2)
        for respond, expected in [(chunked, b"[1,2,3]"), (until_close, b"[4,5]")]:
            server = await start_server(respond)
            head, body = await get(client, server.url)
            assert (head.status, body) == (200, expected)
        await client.aclose()

    async def test_an_informational_answer_is_skipped(self, start_server: StartServer) -> None:
        async def early_hints(head: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            return await ok()(head, writer)

        server = await start_server(early_hints)
        client = Http1Client(max_connections=2)
        head, body = await get(client, server.url)
        assert (head.status, body) == (200, b'{"ok":true}')
        assert head.headers["content-type"] == "application/json"
        await client.aclose()

    @pytest.mark.parametrize("respond", [huge_head, endless_header], ids=["whole", "endless"])
    async def test_a_head_above_the_bound_is_refused(
        self, start_server: StartServer, respond: Respond
    ) -> None:
        server = await start_server(respond)
        client = Http1Client(max_connections=2)
        async with asyncio.timeout(10):
            with pytest.raises(UpstreamConnectionError, match="head above"):
                await get(client, server.url)
        assert client._open == 0
        await client.aclose()

    async def test_bytes_after_an_answer_are_nobodys_answer(
        self, start_server: StartServer
    ) -> None:
        async def extra(head: bytes, writer: asyncio.StreamWriter) -> bool:
            if len(server.requests) == 1:  # its answer and, in the same write, another's start
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nfirst-1"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nSTALE-"
                )
                return True
            return await ok(b"second-2")(head, writer)

        server = await start_server(extra)
        client = Http1Client(max_connections=2)
        heads: list[int] = []
        chunks: list[bytes] = []

        def on_head(head: Head) -> Callable[[bytes], None]:
            heads.append(head.status)
            return chunks.append

        await client.get(server.url, [], on_head)
        assert (heads, b"".join(chunks)) == ([200], b"first-1")
        head, body = await get(client, server.url)
        assert (head.status, body) == (200, b"second-2"), "not the stray bytes"
        assert server.connections == 2, "the connection that carried them was not reused"
        await client.aclose()

    async def test_a_reset_is_not_the_end_of_a_body(self, start_server: StartServer) -> None:
        async def reset(_: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"data": [1, 2, 3')
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST, not FIN
            return False

        server = await start_server(reset)
        client = Http1Client(max_connections=2)
        with pytest.raises(UpstreamConnectionError):
            await get(client, server.url)
        assert client._open == 0
        await client.aclose()

    async def test_bytes_on_an_idle_connection_close_it(self, start_server: StartServer) -> None:
        async def then_stray(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await ok()(head, writer)
            await writer.drain()
            if len(server.requests) == 1:
                await asyncio.sleep(0.01)  # after the answer was read: the connection idles
                writer.write(b"HTTP/1.1 200 OK\r\n")
            return True

        server = await start_server(then_stray)
        client = Http1Client(max_connections=2)
        await get(client, server.url)
        await asyncio.sleep(0.1)
        head, body = await get(client, server.url)
        assert (head.status, body) == (200, b'{"ok":true}')
        assert server.connections == 2, "the idle connection that got bytes was not reused"
        await client.aclose()

    async def test_at_the_cap_connections_make_way_for_another_origin(
        self, start_server: StartServer
    ) -> None:
        async def slow(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(0.05)
            return await ok()(head, writer)

        first, second = await start_server(slow), await start_server(ok())
        client = Http1Client(max_connections=1)
        await get(client, second.url)  # an idle connection to the second origin

        async with asyncio.timeout(5):
            # the first takes the idle one's place; the second's caller waits for it
            answers = await asyncio.gather(get(client, first.url), get(client, second.url))

        assert [head.status for head, _ in answers] == [200, 200]
        assert (first.connections, second.connections) == (1, 2), "one at a time, each origin"
        assert first.most_open + second.most_open <= 2
        assert client._open == 1
        await client.aclose()

    @pytest.mark.parametrize("cancel_first", [True, False], ids=["cancelled", "handed"])
    async def test_a_connection_handed_to_a_caller_giving_up_that_turn_is_kept(
        self, start_server: StartServer, cancel_first: bool
    ) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=1)
        await get(client, server.url)
        (origin,) = client._idle
        connection = client._take_idle(origin)  # the one connection, in use
        assert connection is not None
        waiter = asyncio.create_task(client._turn(origin))
        await asyncio.sleep(0)  # it waits: the cap is reached
        if cancel_first:
            waiter.cancel()
            client._release(connection)
        else:
            client._release(connection)
            waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

        assert (client._open, list(client._idle[origin]), list(client._waiters)) == (
            1,
            [connection],
            [],
        )
        head, _ = await get(client, server.url)
        assert head.status == 200
        assert server.connections == 1
        await client.aclose()

    async def test_credentials_in_the_url_are_refused_not_sent_as_the_host(
        self, start_server: StartServer
    ) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=2)
        with pytest.raises(ValueError, match="credentials"):
            await get(client, server.url.replace("http://", "http://user:secret@"))
        assert server.requests == []
        await client.aclose()

    async def test_an_unwanted_body_is_left_unread_with_its_connection(
        self, start_server: StartServer
    ) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=2)
        head = await client.get(server.url, [], lambda _: None)
        assert head.status == 200
        await get(client, server.url)
        assert server.connections == 2
        await client.aclose()

    async def test_a_line_break_in_a_header_sends_nothing(self, start_server: StartServer) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=2)
        with pytest.raises(ValueError, match="line break"):
            await client.get(server.url, [("authorization", "Bearer x\r\nX-Evil: 1")], list)
        assert server.requests == []
        assert client._open == 0
        await client.aclose()

    async def test_header_values_go_out_as_their_latin1_bytes(
        self, start_server: StartServer
    ) -> None:
        server = await start_server(ok())
        client = Http1Client(max_connections=2)
        await client.get(server.url, [("authorization", "Bearer caf\xe9")], lambda _: None)
        assert b"authorization: Bearer caf\xe9\r\n" in server.requests[0]
        await client.aclose()
