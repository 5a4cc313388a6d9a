"""Handing memory back to the system after a very large page.

A page of 100,000 contacts is a few hundred MB of short-lived Python objects.
They are freed when the request ends, but glibc's allocator keeps the pages for
reuse, so the process's RSS stays at its peak for good. `malloc_trim(0)` (glibc
only; elsewhere nothing happens) returns what is free, from a worker thread, at
most once every `_INTERVAL` seconds. (The event loop's own allocations wait while
it walks the heap: one loop step of tens of ms after a page of ~100,000 contacts.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Final

_INTERVAL: Final = 1.0
_DELAY: Final = 0.5  # once the response that asked, sent, is gone too


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_malloc_trim = _load_malloc_trim()
_scheduled_at = -_INTERVAL


async def release_soon() -> None:
    """Give free memory back to the system shortly (after a large response is sent; async
    so that a Starlette background task runs it in the event loop, not in a thread)."""
    global _scheduled_at
    now = time.monotonic()
    if _malloc_trim is None or now - _scheduled_at < _INTERVAL:
        return
    _scheduled_at = now
    loop = asyncio.get_running_loop()
    loop.call_later(_DELAY, lambda: loop.run_in_executor(None, _malloc_trim, 0))
