"""docs/limits.md: the served configuration bounds what a client holds.

The server is the real one, `python -m app` (app.server), as the Docker image
and `make run` start it, attacked over loopback sockets: oversized request
heads, connections that send nothing, and slowloris clients that send their
headers a byte at a time.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.server import HEAD_TIMEOUT_SECONDS, KEEP_ALIVE_SECONDS, MAX_HEAD_BYTES
from tests.support.procs import eventually
from tests.support.replicas import ROOT, ServiceProcess, clean_env

# A close that comes this much later than the bound is still "within the bound" on a
# loaded 2-core machine.
SLACK_SECONDS = 5.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # Nothing here reaches an upstream or Redis: /health answers on its own.
    service = ServiceProcess(
        {
            "WHATSAPP_API_URL": "http://127.0.0.1:9",
            "CRM_API_URL": "http://127.0.0.1:9",
            "USE_REDIS": "false",
        },
        workdir=tmp_path_factory.mktemp("server-limits"),
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def head(extra_header_bytes: int) -> bytes:
    filler = b"a" * extra_header_bytes
    return b"GET /health HTTP/1.1\r\nHost: test\r\nX-Filler: " + filler + b"\r\n\r\n"


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


class TestHeaderSize:
    def test_a_head_below_64_kib_is_served(self, server: ServiceProcess) -> None:
        response = exchange(server.port, head(MAX_HEAD_BYTES - 1024))
        assert status_of(response) == 200

    def test_a_head_above_64_kib_is_refused_with_431(self, server: ServiceProcess) -> None:
        response = exchange(server.port, head(MAX_HEAD_BYTES + 1024))
        assert status_of(response) == 431
        assert b"connection: close" in response.lower()

    def test_32_mb_of_headers_are_cut_off_without_growing_memory(
        self, server: ServiceProcess
    ) -> None:
        before = rss_bytes(server.pid)
        sent = 0
        total = 32 * 1024 * 1024
        # 1 KB header lines: without the bound the server kept each one (+40 MB RSS).
        block = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 64
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
                while sent < total:
                    sock.sendall(block)
                    sent += len(block)
                sock.sendall(b"\r\n")
            except OSError:
                pass  # the server closed the connection: what this test wants
        grown = rss_bytes(server.pid) - before
        assert sent < total, "the server read all 32 MB of headers"
        assert grown < 8 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


class TestUpgrade:
    async def test_a_websocket_upgrade_is_answered_as_plain_http_without_a_warning(
        self, server: ServiceProcess
    ) -> None:
        # The service has no websocket route, so the server loads no websocket protocol
        # (ws="none": ~10 ms less start-up); the request is served as the GET it also is.
        # With a websocket protocol loaded, the handshake was refused with a 403 instead;
        # without the override, uvicorn logged two warnings for it.
        # (/health's request line is logged at debug; an unknown path's at info.)
        response = exchange(
            server.port,
            b"GET /nowhere HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Request-ID: upgrade-probe\r\n\r\n",
        )
        assert status_of(response) == 404
        # Its request line comes after anything logged while its head was read.
        await eventually(
            lambda: any(line.get("request_id") == "upgrade-probe" for line in server.log_lines())
        )
        assert not [
            line for line in server.log_lines() if "upgrade" in str(line.get("event", "")).lower()
        ]


class TestCollectorAtStartUp:
    """`python -m app` turns the collector off while it imports; building the app
    (app.main.tune_gc) freezes the start-up objects, without a full collection, and turns
    it back on, tuned. The supervisor of --workers N, which builds no app, turns it back on."""

    def run(self, script: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=clean_env(
                {
                    "WHATSAPP_API_URL": "http://127.0.0.1:9",
                    "CRM_API_URL": "http://127.0.0.1:9",
                    "USE_REDIS": "false",
                }
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    # `python -m app ARGS`, with a `serve` that says what the collector is doing instead.
    PROGRAM = (
        "import gc, runpy, sys\n"
        "import app.server\n"
        "app.server.serve = lambda options: print(options.workers, gc.isenabled())\n"
        "sys.argv = ['app', *ARGS]\n"
        "runpy.run_module('app', run_name='__main__')\n"
    )

    def test_off_while_the_program_imports_then_on_and_tuned_once_the_app_is_built(
        self,
    ) -> None:
        script = self.PROGRAM.replace("ARGS", "[]") + (
            "full = gc.get_stats()[2]['collections']\n"
            "import app.main\n"
            "app.main.app\n"
            "print(gc.isenabled(), gc.get_threshold()[0],"
            " gc.get_stats()[2]['collections'] - full)\n"
        )
        # No full collection while the app was imported and built: the start-up objects
        # were frozen without one.
        assert self.run(script) == ["1", "False", "True", "50000", "0"]

    def test_the_supervisor_of_several_workers_turns_it_back_on(self) -> None:
        assert self.run(self.PROGRAM.replace("ARGS", "['--workers', '2']")) == ["2", "True"]

    def test_importing_the_module_leaves_the_collector_alone(self) -> None:
        assert self.run("import gc, app.__main__\nprint(gc.isenabled())") == ["True"]


async def _seconds_until_closed(port: int, send: bytes, trickle: bool = False) -> float:
    """Open a connection, send `send` (a byte a second when `trickle`), time the server's close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        if trickle:
            for byte in send:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(65536), timeout=1.0) == b"":
                        return time.monotonic() - started
                except TimeoutError:
                    continue
        else:
            writer.write(send)
            await writer.drain()
        while await reader.read(65536):
            pass
        return time.monotonic() - started
    except ConnectionError:
        return time.monotonic() - started
    finally:
        writer.close()


class TestClientTime:
    async def test_idle_slow_and_kept_alive_connections_are_closed_within_their_bounds(
        self, server: ServiceProcess
    ) -> None:
        slow_head = b"GET /health HTTP/1.1\r\nHost: test\r\n" + b"X-Slow: " + b"a" * 100
        keep_alive = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
        idle = [_seconds_until_closed(server.port, b"") for _ in range(50)]
        slowloris = [_seconds_until_closed(server.port, slow_head, trickle=True) for _ in range(50)]
        kept = [_seconds_until_closed(server.port, keep_alive) for _ in range(10)]
        runs = asyncio.gather(*idle, *slowloris, *kept)

        # Meanwhile the server keeps answering.
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{server.url}/health")).status_code == 200

        durations = await asyncio.wait_for(runs, timeout=HEAD_TIMEOUT_SECONDS + 30)
        idle_s, slow_s, kept_s = durations[:50], durations[50:100], durations[100:]
        assert max(idle_s) < HEAD_TIMEOUT_SECONDS + SLACK_SECONDS
        assert min(idle_s) > HEAD_TIMEOUT_SECONDS - 1
        # A byte a second never completes the head: closed at the head deadline, not later.
        assert max(slow_s) < HEAD_TIMEOUT_SECONDS + SLACK_SECONDS
        assert min(slow_s) > HEAD_TIMEOUT_SECONDS - 1
        # Answered, then idle: uvicorn's keep-alive timeout.
        assert max(kept_s) < KEEP_ALIVE_SECONDS + SLACK_SECONDS


class _Recorded:
    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.sends.append(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Cycle:
    response_started = False


class TestOneSendPerResponse:
    """app.server._OneSend: a response's head waits for its body, and both go in one send."""

    async def test_head_and_body_go_out_together_and_later_writes_straight(self) -> None:
        from app.server import _OneSend

        transport, cycle = _Recorded(), _Cycle()
        writes = _OneSend(transport, cycle, asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: straight out
        cycle.response_started = True
        writes.write(b"HEAD")
        assert transport.sends == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        writes.write(b"BODY")
        writes.write(b"MORE")
        assert transport.sends[1:] == [b"HEADBODY", b"MORE"]
        assert not writes.is_closing(), "the rest is the transport's"

    async def test_a_head_alone_goes_out_at_the_next_loop_turn_or_at_close(self) -> None:
        from app.server import _OneSend

        loop = asyncio.get_running_loop()
        transport, cycle = _Recorded(), _Cycle()
        cycle.response_started = True
        writes = _OneSend(transport, cycle, loop)  # type: ignore[arg-type]
        writes.write(b"HEAD")  # a HEAD request's answer: no body follows
        await asyncio.sleep(0)
        assert transport.sends == [b"HEAD"]

        transport, cycle = _Recorded(), _Cycle()
        cycle.response_started = True
        writes = _OneSend(transport, cycle, loop)  # type: ignore[arg-type]
        writes.write(b"HEAD")
        writes.close()
        assert (transport.sends, transport.closed) == ([b"HEAD"], True)
        await asyncio.sleep(0)
        assert transport.sends == [b"HEAD"], "never twice"
