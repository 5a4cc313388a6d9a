"""A lean HTTP/1.1 client for the upstream GETs: keep-alive connections pooled per origin,
responses parsed by httptools (llhttp, uvicorn's parser), bodies handed over as they arrive.

aiohttp spent about three times the CPU of this on a GET of a 10 KB page (222-253 vs
71-97 us on the benchmark machine; docs/performance.md). The service needs
little of it: GET only, no redirects, no cookies, no proxies, its own decompression
(app.bodies), one deadline per call set by the caller. What it keeps:

* at most `max_connections` connections open, callers waiting in turn for one;
* an idle connection is not reused after `keepalive_seconds` (below the usual 5 s
  server idle timeout: it is closed when next found), nor once the server closed it;
* a GET sent on a reused connection that the server closed before answering (the
  keep-alive race) is sent once more on a new connection: nothing of it was processed;
* a connection is reused only after a complete response the server let stay open and
  nothing after it, and is closed on any error, refusal or cancellation (the caller's
  deadline); a body that ends with its connection must end with a close, not a reset;
* response heads bounded to `MAX_HEAD_BYTES`; header values sent as their latin-1 bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

#: Response status line and headers, together.
MAX_HEAD_BYTES: Final = 64 * 1024
_UNSAFE_IN_HEADER: Final = frozenset("\r\n\0")


class UpstreamConnectionError(ConnectionError):
    """The upstream could not be reached, closed the connection, or answered malformed HTTP."""


class _Unsolicited(Exception):
    """Bytes after the answer of the exchange in flight (raised to stop the parser there)."""


class Head:
    """A response's status and headers (names lower-case, values latin-1 text, last wins)."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers


#: Receives each piece of the body as it arrives; may raise to refuse the body.
BodySink = Callable[[bytes], None]
#: Given the head, returns the body's sink, or None to leave the body unread.
OnHead = Callable[[Head], BodySink | None]


class _Connection(asyncio.Protocol):
    """One connection and the exchange in flight on it (httptools calls the `on_*` methods)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_read = 0  # bytes received while the head was incomplete
        self._head: Head | None = None
        self._on_head: OnHead | None = None
        self._sink: BodySink | None = None
        self._body_delimited = False
        self._received = False
        self._done: asyncio.Future[Head] | None = None
        self._raised: Exception | None = None
        self._complete = False  # this exchange's answer is whole

    # -- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)

    def data_received(self, data: bytes) -> None:
        if self._done is None or self._done.done():  # unasked for: not to be trusted again
            self.close()
            return
        self._received = True
        if self._head is None:
            # httptools gathers a header line whole before handing it over: what arrives
            # before the head is complete is counted, so that one endless line cannot grow
            # the parser's buffer past the bound and one read.
            if self._head_read > MAX_HEAD_BYTES:
                self._fail(UpstreamConnectionError(f"answer head above {MAX_HEAD_BYTES} bytes"))
                return
            self._head_read += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised: the sink's refusal, the head bound
            if isinstance(self._raised, _Unsolicited):
                self.close()  # the answer stands; the connection is not reused
                return
            self._fail(self._raised or UpstreamConnectionError(f"malformed HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        done = self._done
        if done is None or done.done():
            return
        head = self._head
        if head is not None and not self._body_delimited and exc is None:
            done.set_result(head)  # a body that ends with the connection: this is its end
            return
        self._fail(UpstreamConnectionError("upstream closed the connection"))

    # -- httptools -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # bytes after this exchange's answer: the connection is not sound
            self._raised = _Unsolicited()
            raise self._raised

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            self._raised = UpstreamConnectionError(f"answer head above {MAX_HEAD_BYTES} bytes")
            raise self._raised
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        fields, self._fields = self._fields, []
        if status < 200:  # informational (103 Early Hints...): the answer follows
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in fields
        }
        self._body_delimited = (
            "content-length" in headers
            or "chunked" in headers.get("transfer-encoding", "").lower()
            or status in (204, 304)
        )
        self._head = head = Head(status, headers)
        assert self._on_head is not None
        try:
            self._sink = self._on_head(head)
        except Exception as exc:  # the body refused from its head (announced too large...)
            self._raised = exc
            raise
        if self._sink is None:  # the body is not wanted: the connection goes with it
            self._finish(head, reusable=False)

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            try:
                self._sink(body)
            except Exception as exc:  # the body refused (too large, badly encoded)
                self._raised = exc
                raise

    def on_message_complete(self) -> None:
        head = self._head
        if head is None:  # the end of an informational answer
            self._head_bytes = self._head_read = 0
            return
        self._finish(head, reusable=self.parser.should_keep_alive())

    # -- the exchange --------------------------------------------------------------------

    def start(self, request: bytes, on_head: OnHead) -> asyncio.Future[Head]:
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._on_head = on_head
        self._received = False
        self._complete = False
        if self.transport.is_closing():  # closed under our feet: as if lost as it was sent
            self._fail(UpstreamConnectionError("upstream closed the connection"))
        else:
            self.transport.write(request)
        return self._done

    @property
    def answered_nothing(self) -> bool:
        """Lost before a byte of the answer came: the server never processed the request."""
        return not self._received

    def reset(self) -> None:
        self._head_read = 0
        self._raised = None
        self._head = None
        self._on_head = self._sink = None
        self._done = None
        self._head_bytes = 0

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self, head: Head, *, reusable: bool) -> None:
        self._complete = True
        if not reusable:
            self.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(head)

    def _fail(self, exc: Exception) -> None:
        self.close()
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)


class Http1Client:
    """Pooled HTTP/1.1 GETs to any origin (http or https); one instance per upstream API."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_seconds: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max = max_connections
        self._keepalive = keepalive_seconds
        self._ssl = ssl_context
        self._idle: dict[str, deque[_Connection]] = {}
        self._open = 0  # connections open or opening
        self._waiters: deque[tuple[str, asyncio.Future[_Connection | None]]] = deque()
        self._closed = False
        self._endpoints: dict[tuple[str, str], tuple[str, str, int, bool, str]] = {}

    async def get(self, url: str, headers: Sequence[tuple[str, str]], on_head: OnHead) -> Head:
        """GET `url` (absolute, ASCII) with `headers`; `on_head` decides what becomes of the
        body. Returns once the body has been handed over (or left unread). Raises
        `UpstreamConnectionError` (an `OSError`), what the sink raised, or `ValueError`
        for a header that would break the request."""
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        target = "/" + path.partition("#")[0] if slash else "/"
        endpoint = self._endpoints.get((scheme, netloc))
        if endpoint is None:
            endpoint = self._endpoints[(scheme, netloc)] = _endpoint(url)
        origin, host, port, secure, authority = endpoint
        request = _request(target, authority, headers)
        for attempt in (1, 2):
            connection = self._take_idle(origin) or await self._turn(origin)
            if connection is None:  # a turn to open one
                connection = await self._connect(origin, host, port, secure)
            try:
                head = await connection.start(request, on_head)
            except UpstreamConnectionError:
                self._drop(connection)
                if attempt == 1 and connection.reused and connection.answered_nothing:
                    continue  # the keep-alive race: the server closed it as we sent
                raise
            except BaseException:
                self._drop(connection)
                raise
            self._release(connection)
            return head
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                self._drop(idle.pop())

    # -- the pool ------------------------------------------------------------------------

    def _take_idle(self, origin: str) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive:
                connection.reused = True
                return connection
            self._drop(connection)
        return None

    async def _turn(self, origin: str) -> _Connection | None:
        """A connection to `origin` handed over by a caller done with it, or None: a turn
        to open one (fewer than `max_connections` are open then)."""
        if self._open >= self._max:
            self._close_oldest_idle()
        if self._open < self._max and not self._waiters:
            self._open += 1
            return None
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        entry = (origin, waiter)
        self._waiters.append(entry)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                if (handed := waiter.result()) is not None:
                    self._release(handed)  # handed over just as this caller gave up
                else:
                    self._open -= 1  # a turn, likewise
                    self._wake()
            elif entry in self._waiters:  # (a hand-over may have skipped it already)
                self._waiters.remove(entry)
            raise

    def _close_oldest_idle(self) -> None:
        """At the cap, an idle connection (to another origin) makes way for a new one."""
        for idle in self._idle.values():
            if idle:
                self._drop(idle.popleft())
                return

    def _wake(self) -> None:
        """Give turns to open a connection to the first waiters, while below the cap."""
        while self._waiters and self._open < self._max:
            _, waiter = self._waiters.popleft()
            if not waiter.done():  # (a waiter cancelled this very turn is passed over)
                self._open += 1
                waiter.set_result(None)

    async def _connect(self, origin: str, host: str, port: int, secure: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if secure:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(origin), host, port, ssl=context
            )
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return connection

    def _release(self, connection: _Connection) -> None:
        connection.reset()
        connection.reused = False
        if connection.closed or self._closed:
            self._drop(connection)
            return
        if any(waiter.done() for _, waiter in self._waiters):  # cancelled this very turn
            self._waiters = deque(e for e in self._waiters if not e[1].done())
        for entry in self._waiters:  # handed straight to a caller waiting for its origin
            if entry[0] == connection.origin:
                self._waiters.remove(entry)
                connection.reused = True
                entry[1].set_result(connection)
                return
        if self._waiters:  # callers wait for other origins: this one makes way
            self._drop(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, deque()).append(connection)

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1
        self._wake()


def _endpoint(url: str) -> tuple[str, str, int, bool, str]:
    """Where `url` goes: its origin (the pool's key), host, port, whether over TLS, and its
    `Host` header. Credentials in a URL are refused: they would be sent as the host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
    if "@" in parts.netloc:
        raise ValueError("credentials in an upstream URL are not supported")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}", parts.hostname, port, secure, parts.netloc


def _request(target: str, host: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        if not _UNSAFE_IN_HEADER.isdisjoint(value) or not _UNSAFE_IN_HEADER.isdisjoint(name):
            raise ValueError(f"header {name!r} holds a line break or NUL")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
