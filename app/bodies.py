"""Upstream bodies read incrementally, decompressed here, and abandoned past a size bound.

HTTP libraries do not bound what they inflate: httpx (and aiohttp) hand each
compressed chunk to zlib whole, and a 64 KiB chunk of a gzip bomb inflates to
64 MiB in one call. So the service asks for `gzip, deflate` only, takes the
raw bytes from its client (app.http1, or an httpx client: tests, tools), and inflates them
here at most `_STEP` bytes at a time, counting what comes out: past the limit
the body is refused before it grows further, whatever it claimed or how it was
encoded.
"""

from __future__ import annotations

import zlib
from typing import Final

ACCEPT_ENCODING: Final = "gzip, deflate"

# Largest piece inflated at once: what the bound may be overshot by, at most.
_STEP: Final = 64 * 1024
_GZIP: Final = 16 + zlib.MAX_WBITS
_ZLIB: Final = zlib.MAX_WBITS
_RAW_DEFLATE: Final = -zlib.MAX_WBITS


class BodyTooLarge(Exception):
    """The body, decompressed, is larger than the limit."""


class BadEncoding(Exception):
    """A content encoding that was not asked for, or compressed data that is corrupt or cut."""


class BoundedBody:
    """Collects one body, decoded, up to `limit` bytes; `feed` raises past it."""

    def __init__(self, limit: int, content_encoding: str | None) -> None:
        self._limit = limit
        self._data = bytearray()
        encoding = (content_encoding or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise BadEncoding(f"unexpected content encoding {encoding[:40]!r}")
        self._encoding = encoding
        self._inflater: zlib._Decompress | None = None
        self._head = b""

    def check_length(self, content_length: str | None) -> None:
        """Refuse at once an uncompressed body announced larger than the limit."""
        announced = int(content_length) if content_length and content_length.isdigit() else 0
        if self._encoding == "identity" and announced > self._limit:
            raise BodyTooLarge(f"announced {announced} bytes")

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._encoding == "identity":
            self._append(chunk)
            return
        data = chunk
        if self._encoding == "deflate" and self._inflater is None:
            # Two bytes tell a zlib header from raw deflate: wait for the second.
            data, self._head = self._head + chunk, b""
            if len(data) < 2:
                self._head = data
                return
        while data:
            inflater = self._next_inflater(data)
            try:
                out = inflater.decompress(data, _STEP)
                self._append(out)
                data = inflater.unconsumed_tail
                # All input taken with a full step out: zlib may hold more output, drain it.
                while not data and len(out) == _STEP and not inflater.eof:
                    out = inflater.decompress(b"", _STEP)
                    self._append(out)
            except zlib.error as exc:
                raise BadEncoding(f"corrupt compressed body: {exc}") from None
            if inflater.eof:
                data = inflater.unused_data

    def finish(self) -> bytearray:
        """The whole decoded body; raises `BadEncoding` when compressed data was cut short."""
        # (An empty body with a content-encoding header has nothing to inflate.)
        if self._head or (self._inflater is not None and not self._inflater.eof):
            raise BadEncoding("compressed body ends before its end of stream")
        return self._data

    def _next_inflater(self, data: bytes) -> zlib._Decompress:
        inflater = self._inflater
        if inflater is not None and not inflater.eof:
            return inflater
        if inflater is not None and self._encoding == "deflate":
            raise BadEncoding("data after the end of a deflate stream")
        # The first gzip member, or the next one (RFC 1952 lets members follow each other).
        if self._encoding == "deflate":
            # "deflate" is zlib-wrapped per RFC 9110, yet some servers send raw deflate.
            wbits = _ZLIB if _zlib_header(data) else _RAW_DEFLATE
        else:
            wbits = _GZIP
        self._inflater = zlib.decompressobj(wbits)
        return self._inflater

    def _append(self, data: bytes) -> None:
        if len(self._data) + len(data) > self._limit:
            raise BodyTooLarge(f"larger than {self._limit} bytes")
        self._data += data


def _zlib_header(data: bytes) -> bool:
    """Whether `data` starts with a zlib header (RFC 1950: method 8, check bits)."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] * 256 + data[1]) % 31 == 0
