"""How the service is served: uvicorn with the bounds a public HTTP server needs.

`python -m app` (the Docker image's command and `make run`) goes through
`serve()`, so both run the same server configuration. uvicorn's httptools
protocol, the fast one, bounds neither the size of a request's head nor the
time a client may take to send it: a client could send 32 MB of headers (all
buffered) or hold a connection open with a byte every few seconds
(slowloris), and a connection that never sends anything was kept forever.
`BoundedHttpToolsProtocol` adds both bounds; uvicorn's own keep-alive timeout
covers the idle time between two requests.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.logging import UVICORN_LOG_CONFIG

# Above this, the request line plus headers are refused with 431 (nginx's own
# default is 4 x 8 KiB; docs/limits.md: 64 KiB).
MAX_HEAD_BYTES = 64 * 1024
# From a request's first byte (or from the connection's opening) to the end of its
# headers. Real clients send a head in one packet; this only has to outlast a slow link.
HEAD_TIMEOUT_SECONDS = 10.0
# Idle time allowed between two requests on one connection. nginx's keepalive to
# the replicas closes its side after 4 s, before this (deploy/nginx.conf).
KEEP_ALIVE_SECONDS = 5

_TOO_LARGE = b"request header fields too large"
_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_TOO_LARGE)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _TOO_LARGE
)


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops and uvicorn answers through
    `send_400_response`, which the protocol below turns into a 431."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a size and a time bound on each request head.

    The size is checked twice: on what the parser hands over (a whole head that
    arrived in one read), and on the bytes of every read after which the head
    is still incomplete, so the parser never buffers more than the bound plus
    one read whatever a client sends.
    """

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_parsed = 0
        self._head_read = 0
        self._reading_head = False
        self._head_too_large = False
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is bounded too.
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_head and not self.transport.is_closing():
            # Everything in this read belongs to a head still incomplete after it.
            self._head_read += len(data)
            if self._head_read > self.max_head_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_parsed = self._head_read = 0
        self._reading_head = True
        if self._head_deadline is None:  # the next request of a kept-alive connection
            self._arm_head_deadline()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm_head_deadline()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = _OneSend(self.transport, cycle, self.loop)  # type: ignore[assignment]

    def _unsupported_upgrade_warning(self) -> None:
        # No websocket protocol is loaded (ws="none": the service has no websocket route),
        # so an upgrade request is served as the plain request it also is: nothing to warn
        # about, and no log line any client can make the server write at will (uvicorn
        # logged two warnings per such request, one advising to install a websocket library).
        pass

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _count_head(self, size: int) -> None:
        self._head_parsed += size
        if self._head_parsed > self.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge()

    def _refuse_head(self) -> None:
        self._reading_head = False
        self._disarm_head_deadline()
        self.transport.write(_TOO_LARGE_RESPONSE)
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class _OneSend:
    """The transport of one request's response: its head is held until the body's first
    write (one loop turn at most), and both go out in one send. uvicorn writes them
    apart, and the head's own send to an idle socket cost more CPU than the 44 KB body
    after it (docs/performance.md). Everything else is the transport's."""

    __slots__ = ("_cycle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._cycle = cycle
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        cycle = self._cycle
        if held is not None:
            self._held = None
            self._transport.writelines([held, data])
        elif cycle is not None and cycle.response_started and data:
            # the head (a 100 Continue is written before the response starts): held once
            self._cycle = None
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # None: uvicorn's default (trust X-Forwarded-* from 127.0.0.1 only).
    forwarded_allow_ips: str | None = None


def uvicorn_config(options: ServeOptions) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.run` for the service."""
    return {
        "host": options.host,
        "port": options.port,
        "workers": options.workers,
        "loop": "auto",  # uvloop where it is installed (not on Windows)
        "http": BoundedHttpToolsProtocol,
        # No websocket route: no websocket protocol either (an upgrade request is served
        # as plain HTTP), and ~10 ms less start-up importing one.
        "ws": "none",
        "proxy_headers": True,
        "forwarded_allow_ips": options.forwarded_allow_ips,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        # The app writes one structured line per request itself; uvicorn's own
        # lines (the supervisor's of --workers N too) go through the same formatter.
        "access_log": False,
        "log_config": UVICORN_LOG_CONFIG,
    }


def serve(options: ServeOptions) -> None:
    # By import string: with --workers N each worker process imports the app itself.
    uvicorn.run("app.main:app", **uvicorn_config(options))


def env_int(name: str, default: int) -> int:
    """An integer from the environment (PORT, WEB_CONCURRENCY); a clear error otherwise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, not {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, not {value}")
    return value
