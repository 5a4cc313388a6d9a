"""Admission control: how many `/contacts` requests use the event loop at once.

A process has one event loop, and every Redis call runs under a deadline
(`REDIS_TIMEOUT_SECONDS`). Past a few dozen requests at once, a reply that
Redis sent in well under a millisecond waits its turn behind every other
request's work (and the pooled connections are all held meanwhile), the
deadline passes, and a healthy Redis is counted as failing: the page is read
as misses, and failures in a row open the breaker, so overload becomes more
work (docs/design.md, "Overload"). Requests beyond the limit therefore wait
their turn, first come first served, before they do anything: parse their
page, read its ids and Redis, encode the answer. A request waiting on the
contacts API or the CRM gives its turn back meanwhile, so a slow upstream never
holds back pages that are cached, and takes it again ahead of the requests
not yet begun. Background work (leases, cache writes, refreshes) takes no turn.

The queue is bounded in time, not unbounded: a new request that has not had its
turn within `ADMISSION_QUEUE_TIMEOUT_SECONDS` is refused (503 with `Retry-After`)
before any work, so overload is shed instead of turning into latency for
everyone. Resumed requests are never shed: their upstream calls are done.
"""

from __future__ import annotations

import asyncio
from collections import deque

from app import metrics
from app.errors import Overloaded


class Admission:
    """At most `limit` holders at once; the others wait in arrival order (FIFO), resumed
    requests (`first`) ahead of new ones."""

    def __init__(self, limit: int, queue_timeout: float | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.queue_timeout = queue_timeout
        self._active = 0
        self._resumed: deque[asyncio.Future[None]] = deque()
        self._new: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return sum(1 for w in (*self._resumed, *self._new) if not w.done())

    def slot(self) -> Slot:
        """One request's turn: `async with admission.slot() as slot:`."""
        return Slot(self)

    async def acquire(self, *, first: bool = False) -> bool:
        """Wait for a turn; `first` goes ahead of the requests that have not begun.

        True when it had to wait, False when a turn was free. Raises `Overloaded` when
        a new request (not `first`) waited `queue_timeout` seconds without a turn.
        """
        if self._active < self.limit and not self._resumed and not self._new:
            self._active += 1
            metrics.ADMISSION_ACTIVE.inc()
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._resumed if first else self._new
        queue.append(waiter)
        metrics.ADMISSION_QUEUED.inc()
        metrics.ADMISSION_WAITS.inc()
        timeout = None if first else self.queue_timeout
        try:
            # `release` hands its turn over: `_active` stays as it is. (Not wait_for: on
            # Python 3.11 it can swallow a cancellation that comes just after the hand-over.)
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            if waiter.done():  # handed a turn just as the time ran out: take it
                return True
            queue.remove(waiter)
            waiter.cancel()
            metrics.ADMISSION_SHED.inc()
            raise Overloaded() from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a turn just as it was cancelled: pass it on
            elif waiter in queue:  # (a `release` in between may have dropped it already)
                queue.remove(waiter)
            raise
        finally:
            metrics.ADMISSION_QUEUED.dec()
        return True

    def release(self) -> None:
        for queue in (self._resumed, self._new):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():  # not cancelled
                    waiter.set_result(None)
                    return
        self._active -= 1
        metrics.ADMISSION_ACTIVE.dec()


class Slot:
    """A request's turn, which it can give back while it waits on I/O (`pause`/`resume`)."""

    __slots__ = ("_admission", "_held", "waited")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = False
        #: whether the request had to wait for its first turn
        self.waited = False

    async def __aenter__(self) -> Slot:
        self.waited = await self._admission.acquire()
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
