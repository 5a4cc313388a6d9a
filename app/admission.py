"""Admission control: how many `/contacts` requests use the event loop at once.

A process has one event loop, and every Redis call runs under a deadline
(`REDIS_TIMEOUT_SECONDS`). Past a few dozen requests at once, a reply that
Redis sent in well under a millisecond waits its turn behind every other
request's work, the deadline passes, and a healthy Redis is counted as
failing: the page is read as misses and the breaker opens, so overload
becomes more work (measured in bench/README.md). Requests beyond the limit
therefore wait their turn, first come first served, before they parse, read
Redis and encode; a request waiting for the contacts API or the CRM gives
its turn back meanwhile, so a slow upstream never holds back pages that are
cached, and takes it again ahead of the requests not yet begun.
"""

from __future__ import annotations

import asyncio
from collections import deque

from app import metrics


class Admission:
    """At most `limit` holders at once; the others wait in arrival order (FIFO)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def slot(self) -> Slot:
        """One request's turn: `async with admission.slot() as slot:`."""
        return Slot(self)

    async def acquire(self, *, first: bool = False) -> None:
        """Wait for a turn; `first` goes ahead of every waiting request (work already begun)."""
        if self._active < self.limit and not self._waiters:
            self._active += 1
            metrics.ADMISSION_ACTIVE.inc()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        metrics.ADMISSION_QUEUED.inc()
        metrics.ADMISSION_WAITS.inc()
        try:
            await waiter  # `release` hands its turn over: `_active` stays as it is
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a turn just as it was cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        finally:
            metrics.ADMISSION_QUEUED.dec()

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1
        metrics.ADMISSION_ACTIVE.dec()


class Slot:
    """A request's turn, which it can give back while it waits on I/O (`pause`/`resume`)."""

    __slots__ = ("_admission", "_held")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = False

    async def __aenter__(self) -> Slot:
        await self._admission.acquire()
        self._held = True
        return self

    async def __aexit__(self, *_: object) -> None:
        self.pause()

    def pause(self) -> None:
        """Give the turn back (idempotent)."""
        if self._held:
            self._held = False
            self._admission.release()

    async def resume(self) -> None:
        """Take a turn again, ahead of the requests that have not begun: finishing the work
        already done (a page parsed, its CRM objects fetched) frees its memory soonest."""
        if not self._held:
            await self._admission.acquire(first=True)
            self._held = True
