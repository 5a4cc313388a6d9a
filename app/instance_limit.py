"""At most N concurrent upstream calls per instance, so one tenant cannot hold a whole pool."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Turns:
    semaphore: asyncio.Semaphore
    users: int = field(default=0)


class PerInstanceLimit:
    """A semaphore per instance, created on first use and dropped when nobody holds or awaits it.

    The bookkeeping is bounded by the calls in flight, not by the instances ever seen.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._turns: dict[str, _Turns] = {}

    async def acquire(self, instance: str) -> None:
        """Wait for a turn of `instance` (cancellable: a deadline around it holds)."""
        turns = self._turns.get(instance)
        if turns is None:
            turns = self._turns[instance] = _Turns(asyncio.Semaphore(self._limit))
        turns.users += 1
        try:
            await turns.semaphore.acquire()
        except BaseException:
            self._leave(instance, turns)
            raise

    def release(self, instance: str) -> None:
        """Give back the turn taken by `acquire`."""
        turns = self._turns[instance]
        turns.semaphore.release()
        self._leave(instance, turns)

    def tracked(self) -> int:
        """Instances with a call in flight or waiting (for tests and metrics)."""
        return len(self._turns)

    def _leave(self, instance: str, turns: _Turns) -> None:
        turns.users -= 1
        if turns.users == 0:
            del self._turns[instance]
