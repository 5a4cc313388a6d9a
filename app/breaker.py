"""A circuit breaker for Redis: after repeated failures, skip it for a while, then probe."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import structlog

from app import metrics

log = structlog.get_logger("app.redis")


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures; `threshold` of them open the circuit for `cooldown` seconds.

    While open, `allow()` is False and callers go straight to the fallback, so
    an outage costs no latency. After the cooldown one probe is let through:
    its success closes the circuit, its failure opens it again. Each state
    change is logged once, never each request.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = State.CLOSED

    def allow(self) -> bool:
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._change(State.HALF_OPEN)
        if self.state is State.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        metrics.REDIS_UP.set(1)
        if self.state is not State.CLOSED:
            self._change(State.CLOSED)

    def abandon(self) -> None:
        """The call let through was cancelled before it could tell; let the next one probe."""
        self._probing = False

    def failure(self, error: BaseException) -> None:
        self._failures += 1
        self._probing = False
        metrics.REDIS_UP.set(0)
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED and self._failures >= self._threshold
        ):
            self._opened_at = self._clock()
            self._change(State.OPEN, error=f"{type(error).__name__}: {error}")

    def _change(self, state: State, **fields: object) -> None:
        previous, self.state = self.state, state
        metrics.REDIS_CIRCUIT_OPEN.set(1 if state is State.OPEN else 0)
        if state is State.OPEN:
            log.warning(
                "redis.circuit_open",
                previous=previous.value,
                cooldown_seconds=self._cooldown,
                **fields,
            )
        elif state is State.CLOSED:
            log.warning("redis.circuit_closed", previous=previous.value)
        else:
            log.info("redis.circuit_half_open")
