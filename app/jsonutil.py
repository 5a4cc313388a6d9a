"""Strict JSON (RFC 8259) with orjson, and the standard library where orjson would change a value.

Every upstream body is first parsed by orjson, which refuses what RFC 8259 or
an exact copy cannot carry: `NaN`, `Infinity`, numbers beyond a double
(`1e999`), lone surrogates, invalid UTF-8, a byte order mark and nesting
beyond 1,024 levels. orjson turns integers beyond 64 bits into floats
silently, so a body with a run of 19 or more digits (which may be such an
integer) is parsed again by the standard library, exactly; everything else
takes the fast path alone. Either way the verdict on the content is orjson's,
so both paths give the same answer.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

Fragment = orjson.Fragment

# The deepest nesting orjson encodes (it refuses the 255th level): a document deeper
# than this could be parsed but never served, so it is refused when it is read.
MAX_DEPTH = 254

# Every ASCII digit becomes "0" and every other byte "." (one C pass), so a run of 19
# digits is a plain substring search: ~10x faster than the regular expression rb"\d{19}".
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_LONG_RUN = b"0" * 19


class InvalidJSON(ValueError):
    """Content that is not strict RFC 8259 JSON, or that nests deeper than `MAX_DEPTH`."""


def is_exotic(data: bytes | bytearray) -> bool:
    """True when `data` may hold an integer that orjson cannot represent exactly."""
    return _LONG_RUN in data.translate(_DIGITS_AS_ZEROS)


def loads(data: bytes | bytearray) -> Any:
    """Parse strict JSON exactly; raises `InvalidJSON` (a `ValueError`) when it is not."""
    return parse(data)[0]


def parse(data: bytes | bytearray, *, check_depth: bool = True) -> tuple[Any, bool]:
    """The value of strict JSON `data`, and whether it took the exact (standard library) path.

    `check_depth=False` leaves the `MAX_DEPTH` check of a fast-path value to
    whoever encodes it with `dumps`, which refuses it then at no extra cost.
    Raises `InvalidJSON`.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(str(exc)) from None
    exact = is_exotic(data)
    if check_depth or exact:
        _check_depth(value)
    if not exact:
        return value, False
    try:
        return json.loads(data), True
    except (ValueError, RecursionError) as exc:  # orjson accepted it: only the stack can fail
        raise InvalidJSON(type(exc).__name__) from None


def dumps(value: Any, *, exact: bool = True) -> bytes:
    """Compact strict JSON bytes (UTF-8, nothing escaped that need not be).

    `exact=False` is for values of the fast path (no integer beyond 64 bits):
    orjson alone, so nesting beyond `MAX_DEPTH` is refused. Raises `InvalidJSON`
    for what strict JSON cannot carry.
    """
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        # an integer beyond 64 bits (the exact path's to write), or nesting too deep
        if not exact:
            raise InvalidJSON(f"cannot encode as strict JSON: {exc}") from None
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode()
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidJSON(f"cannot encode as strict JSON: {type(exc).__name__}") from None


def _check_depth(value: Any) -> None:
    try:
        orjson.dumps(value)
    except TypeError:
        raise InvalidJSON(f"nested deeper than {MAX_DEPTH} levels") from None
