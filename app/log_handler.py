"""The process's log handler: a StreamHandler that also takes ready-made lines and
writes those of one event-loop iteration at once.

A `write()` per line is a system call per request, and a wake-up of whatever
reads stdout (Docker's log driver); the lines that requests finish in one
iteration of the event loop go out together right after it instead.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import logging
import select
import threading
from collections.abc import Iterator
from typing import IO, Final

# Lines waiting for the end of the event-loop iteration are written at once above
# this: what memory holds, and what a crash can lose, stays bounded.
MAX_PENDING_BYTES: Final = 64 * 1024
# Writes of up to PIPE_BUF bytes reach a pipe whole, never mixed with another process's.
ATOMIC_WRITE: Final[int] = getattr(select, "PIPE_BUF", 512)


class BatchingHandler(logging.StreamHandler[IO[str]]):
    """Records as a StreamHandler writes them, and lines given to `add` (the request
    lines of app.logging.HotLogger), gathered over one event-loop iteration and
    written after it, in writes of at most `PIPE_BUF` bytes (whole lines each).

    Pending lines are written before any other record and whenever the handler is
    flushed (`logging.shutdown` at exit does), so no line is lost on a clean stop and
    the output keeps the order in which lines were logged. A crash loses at most the
    lines of the iteration it interrupts (`MAX_PENDING_BYTES` at most). A blocked
    stdout blocks the writer, as it blocks the stdlib handler: nothing piles up.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._drain_loop: asyncio.AbstractEventLoop | None = None
        self._binary: tuple[IO[str] | None, IO[bytes] | None] = (None, None)

    def add(self, line: bytes) -> None:
        """Write `line` (UTF-8, newline included) after this event-loop iteration; at once
        outside a running loop."""
        with self._pending_lock:
            self._pending.append(line)
            self._pending_bytes += len(line)
            full = self._pending_bytes >= MAX_PENDING_BYTES
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if full or loop is None:
            self.drain()
        elif self._drain_loop is not loop:
            # Also when an earlier loop was closed before it ran its drain.
            self._drain_loop = loop
            loop.call_soon(self._drain_from_loop)

    def emit(self, record: logging.LogRecord) -> None:
        self.drain()
        super().emit(record)

    def flush(self) -> None:
        self.drain()
        super().flush()

    def _drain_from_loop(self) -> None:
        self._drain_loop = None
        self.drain()

    def drain(self) -> None:
        """Write the pending lines now (under the handler's lock, so they precede any record
        another thread writes after them)."""
        if not self._pending:
            return
        self.acquire()
        try:
            with self._pending_lock:
                lines, self._pending, self._pending_bytes = self._pending, [], 0
            for chunk in _chunks(lines):
                self._write(chunk)
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "request lines lost"}))
        finally:
            self.release()

    def _write(self, data: bytes) -> None:
        stream = self.stream
        binary = self._binary_of(stream)
        if binary is None:
            stream.write(data.decode())
            stream.flush()
        else:
            stream.flush()  # text written to the stream before goes first
            _write_all(binary, data)
            binary.flush()

    def _binary_of(self, stream: IO[str]) -> IO[bytes] | None:
        """The byte stream under `stream` when its text is UTF-8 (so orjson's bytes go as
        they are), else None."""
        known, binary = self._binary
        if known is not stream:
            binary = getattr(stream, "buffer", None)
            encoding = getattr(stream, "encoding", None) or ""
            try:
                utf8 = codecs.lookup(encoding).name == "utf-8"
            except LookupError:
                utf8 = False
            binary = binary if utf8 else None
            self._binary = (stream, binary)
        return binary


def _write_all(binary: IO[bytes], data: bytes) -> None:
    # Under PYTHONUNBUFFERED (the Docker image) stdout's bytes go straight to a FileIO,
    # whose write() may take only part of them.
    view = memoryview(data)
    while view:
        written = binary.write(view)
        if written is None:  # a non-blocking stdout that is full: what TextIOWrapper does
            raise BlockingIOError(errno.EAGAIN, "stdout is full", len(data) - len(view))
        view = view[written:]


def _chunks(lines: list[bytes]) -> Iterator[bytes]:
    """The lines joined into writes of at most `ATOMIC_WRITE` bytes (a longer line alone).

    A pipe takes a write that size whole, so the lines of the workers of
    `--workers N`, which share stdout, never mix within a line, as with one
    write per line.
    """
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > ATOMIC_WRITE:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)
