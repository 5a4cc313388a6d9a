"""Admission control: at most MAX_ACTIVE_REQUESTS at once, in order; waits on I/O don't count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.admission import Admission
from app.errors import Overloaded
from simupstream.app import Failure
from tests.conftest import Service, Sim, StartService
from tests.support.procs import RedisServer, eventually


async def _turns() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def _gauges() -> tuple[float | None, float | None]:
    """The process's `admission_active` and `admission_queued` (shared by every Admission)."""
    return (
        REGISTRY.get_sample_value("admission_active"),
        REGISTRY.get_sample_value("admission_queued"),
    )


@pytest.fixture
def gauges_settle() -> Iterator[None]:
    """Each test leaves the process-wide gauges as it found them: no turn is leaked."""
    before = _gauges()
    yield
    assert _gauges() == before


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Tasks a test starts; whatever still runs at its end (a failed assertion) is cancelled."""
    started: list[asyncio.Task[Any]] = []
    yield started
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


@pytest.mark.usefixtures("gauges_settle")
class TestAdmission:
    async def test_at_most_limit_hold_a_turn_and_the_others_enter_in_arrival_order(
        self, tasks: list[asyncio.Task[Any]]
    ) -> None:
        admission = Admission(2)
        entered: list[int] = []
        done = {n: asyncio.Event() for n in range(5)}

        async def request(n: int) -> None:
            async with admission.slot():
                entered.append(n)
                await done[n].wait()

        tasks += [asyncio.create_task(request(n)) for n in range(5)]
        await _turns()
        assert entered == [0, 1]
        assert (admission.active, admission.queued) == (2, 3)

        done[1].set()
        await _turns()
        assert entered == [0, 1, 2]
        done[0].set()
        await _turns()
        assert entered == [0, 1, 2, 3]
        for event in done.values():
            event.set()
        await asyncio.gather(*tasks)
        assert entered == [0, 1, 2, 3, 4]
        assert (admission.active, admission.queued) == (0, 0)

    async def test_a_cancelled_waiter_leaves_no_trace(self, tasks: list[asyncio.Task[Any]]) -> None:
        admission = Admission(1)
        base_active, base_queued = _gauges()
        await admission.acquire()
        tasks.append(waiter := asyncio.create_task(admission.acquire()))
        await _turns()
        assert admission.queued == 1
        assert _gauges() == (base_active + 1, base_queued + 1)

        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (admission.active, admission.queued) == (1, 0)
        assert _gauges() == (base_active + 1, base_queued)
        admission.release()
        assert admission.active == 0
        await asyncio.wait_for(admission.acquire(), 1)  # free at once: nothing was lost
        assert admission.active == 1
        admission.release()

    async def test_a_waiter_cancelled_then_skipped_by_a_release_still_raises_cancelled(
        self, tasks: list[asyncio.Task[Any]]
    ) -> None:
        admission = Admission(1)
        await admission.acquire()
        tasks.append(waiter := asyncio.create_task(admission.acquire()))
        await _turns()

        waiter.cancel()  # its future is cancelled now, its clean-up runs later...
        admission.release()  # ...after this release has dropped it and found no one else
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (admission.active, admission.queued) == (0, 0)

    async def test_a_turn_handed_to_a_waiter_cancelled_meanwhile_passes_to_the_next(
        self, tasks: list[asyncio.Task[Any]]
    ) -> None:
        admission = Admission(1)
        await admission.acquire()
        tasks.append(first := asyncio.create_task(admission.acquire()))
        tasks.append(second := asyncio.create_task(admission.acquire()))
        await _turns()

        admission.release()  # hands the turn to `first`, which has not run yet...
        first.cancel()  # ...and is cancelled before it does
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        assert (admission.active, admission.queued) == (1, 0)
        admission.release()
        assert admission.active == 0

    async def test_paused_slots_let_others_in_and_resume_in_order_ahead_of_new_requests(
        self, tasks: list[asyncio.Task[Any]]
    ) -> None:
        admission = Admission(1)
        order: list[str] = []
        gate = asyncio.Event()

        async def request(name: str, pause: asyncio.Event | None = None) -> None:
            async with admission.slot() as slot:
                order.append(name)
                if pause is not None:
                    slot.pause()  # e.g. waiting for the CRM
                    slot.pause()  # idempotent
                    await pause.wait()
                    await slot.resume()
                    order.append(f"{name} again")
                else:
                    await gate.wait()

        crm_a, crm_b = asyncio.Event(), asyncio.Event()
        tasks.append(asyncio.create_task(request("a", crm_a)))
        tasks.append(asyncio.create_task(request("b", crm_b)))
        tasks.append(asyncio.create_task(request("c")))  # holds the turn until `gate`
        await _turns()
        assert order == ["a", "b", "c"]
        tasks.append(asyncio.create_task(request("d")))  # new, waits behind `c`
        await _turns()
        crm_a.set()  # `a` asks for its turn back first, then `b`
        await _turns()
        crm_b.set()
        await _turns()
        assert admission.queued == 3

        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 1)
        assert order == ["a", "b", "c", "a again", "b again", "d"]
        assert (admission.active, admission.queued) == (0, 0)

    async def test_a_new_request_still_waiting_at_the_queue_timeout_is_shed_without_a_trace(
        self,
    ) -> None:
        admission = Admission(1, queue_timeout=0.05)
        shed_before = REGISTRY.get_sample_value("admission_shed_total") or 0.0
        assert await admission.acquire() is False
        with pytest.raises(Overloaded) as refused:
            await admission.acquire()
        assert refused.value.status_code == 503
        assert refused.value.headers == {"retry-after": "1"}
        assert (admission.active, admission.queued) == (1, 0)
        assert REGISTRY.get_sample_value("admission_shed_total") == shed_before + 1
        admission.release()
        assert await admission.acquire() is False, "the shed waiter left no place in the queue"
        admission.release()
        assert admission.active == 0

    async def test_a_resumed_request_is_never_shed(self, tasks: list[asyncio.Task[Any]]) -> None:
        admission = Admission(1, queue_timeout=0.01)
        await admission.acquire()
        resumed = asyncio.create_task(admission.acquire(first=True))
        tasks.append(resumed)
        await asyncio.sleep(0.2)  # twenty times the queue timeout
        assert not resumed.done()
        admission.release()
        assert await resumed is True
        admission.release()
        assert admission.active == 0

    @pytest.mark.parametrize("steps", [0, 1])
    async def test_a_cancel_right_after_the_hand_over_is_honoured_and_the_turn_passed_on(
        self, steps: int
    ) -> None:
        admission = Admission(1, queue_timeout=5.0)
        await admission.acquire()
        waiting = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        admission.release()  # the turn goes to the waiter...
        for _ in range(steps):
            await asyncio.sleep(0)
        waiting.cancel()  # ...which is cancelled before it runs (shutdown, client gone)

        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert admission.active == 0, "the turn it was handed is free again"

    def test_a_limit_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError):
            Admission(0)


class _RecordingSlot:
    """Stands in for a request's turn and records what the resolver does with it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pause(self) -> None:
        self.events.append("pause")

    async def resume(self) -> None:
        self.events.append("resume")


class TestResolverGivesTheTurnBack:
    async def test_only_while_it_waits_for_the_crm(self, start_service: StartService) -> None:
        service = await start_service()
        resolver = service.resources["resolver"]
        wanted = {"customer": ["1", "2"], "user": ["1"]}

        cold = _RecordingSlot()
        resolution = await resolver.resolve("acme", wanted, None, "r1", slot=cold)
        await service.settle()
        warm = _RecordingSlot()
        again = await resolver.resolve("acme", wanted, None, "r2", slot=warm)

        assert resolution.misses == 3
        assert resolution.values["customer"]["1"] is not None
        assert cold.events == ["pause", "resume"], "the turn is taken back before returning"
        assert again.hits == 3
        assert warm.events == [], "a cached page never gives its turn away"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


_PAGE = "/contacts?instance=acme&per_page=20"


async def _cached(start_service: StartService, limit: int) -> tuple[Service, Admission]:
    """A service whose turns are `limit`, with `_PAGE` cached; Redis may pause for 30 s."""
    service = await start_service(
        max_active_requests=limit, redis_timeout_seconds=30, admission_queue_timeout_seconds=30
    )
    assert (await service.get(_PAGE)).status_code == 200
    await service.settle()
    return service, service.resources["admission"]


class TestAdmissionInTheService:
    async def test_requests_beyond_the_limit_wait_their_turn_and_all_succeed(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service, admission = await _cached(start_service, 2)
        # The gauges are the process's, which every in-process service of the test run shares.
        before = (await service.get("/metrics")).text
        redis_server.reset_stats()

        redis_server.pause()  # every MGET now waits: the requests pile up
        pending = [asyncio.create_task(service.get(_PAGE)) for _ in range(5)]
        try:
            await eventually(lambda: admission.queued == 3, message="3 requests queued")
            assert admission.active == 2
            during = (await service.get("/metrics")).text
        finally:
            redis_server.resume()
            responses = await asyncio.gather(*pending)
        for name, expected in (("admission_active", 2), ("admission_queued", 3)):
            assert _metric(during, name) - _metric(before, name) == expected, name
        assert (
            _metric(during, "admission_waits_total") - _metric(before, "admission_waits_total") == 3
        )

        assert [r.status_code for r in responses] == [200] * 5
        assert {r.headers["x-enrichment"] for r in responses} == {"complete"}
        assert redis_server.command_counts().get("mget") == 5, "one Redis read each, no retry"
        assert (admission.active, admission.queued) == (0, 0)

    async def test_a_request_waiting_for_the_crm_does_not_hold_back_a_cached_page(
        self, start_service: StartService, sim: Sim
    ) -> None:
        service = await start_service(max_active_requests=1, upstream_timeout_seconds=3)
        assert (await service.get(_PAGE)).headers["x-enrichment"] == "complete"
        await service.settle()

        sim.state.fail["customers"] = Failure(hang=True)  # the CRM stops answering
        cold = asyncio.create_task(service.get("/contacts?instance=other&per_page=20"))
        await eventually(lambda: sim.stats()["calls"]["customers"] == 2, message="CRM called")
        warm = await service.get(_PAGE)

        assert warm.status_code == 200
        assert warm.headers["x-enrichment"] == "complete"
        assert not cold.done(), "the cold request is still waiting for the CRM"
        late = await cold
        assert late.status_code == 200
        assert late.headers["x-enrichment"] == "partial"

    async def test_a_request_whose_client_left_while_it_waited_is_dropped_unserved(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service, admission = await _cached(start_service, 1)
        redis_server.reset_stats()

        redis_server.pause()  # the first request holds the only turn, in its MGET
        try:
            holder = asyncio.create_task(service.get(_PAGE))
            await eventually(lambda: admission.active == 1, message="the turn is taken")
            _, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
            writer.write(f"GET {_PAGE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            await eventually(lambda: admission.queued == 1, message="the second one queued")
            client_port = writer.get_extra_info("sockname")[1]
            assert service.server.has_client(client_port)
            writer.close()  # the client gives up
            await writer.wait_closed()
            await eventually(
                lambda: not service.server.has_client(client_port),
                message="the server saw the client go",
            )
        finally:
            redis_server.resume()
        assert (await holder).status_code == 200
        await eventually(lambda: admission.active == 0, message="the dropped request is done")
        metrics = (await service.get("/metrics")).text

        assert redis_server.command_counts().get("mget") == 1, "no Redis read for nobody"
        assert 'http_requests_total{method="GET",route="/contacts",status="499"}' in metrics
        assert (admission.active, admission.queued) == (0, 0)

    async def test_a_request_without_a_turn_in_time_gets_503_before_any_work(
        self, start_service: StartService, redis_server: RedisServer, sim: Sim
    ) -> None:
        service = await start_service(
            max_active_requests=1, redis_timeout_seconds=30, admission_queue_timeout_seconds=0.2
        )
        assert (await service.get(_PAGE)).status_code == 200
        await service.settle()
        admission: Admission = service.resources["admission"]
        redis_server.reset_stats()
        sim.state.reset()

        redis_server.pause()  # the first request holds the only turn, in its MGET
        try:
            holder = asyncio.create_task(service.get(_PAGE))
            await eventually(
                lambda: admission.active == 1 and sim.stats()["calls"]["contacts"] == 1,
                message="the turn is taken, for the Redis read",
            )
            shed = await service.get(_PAGE)
        finally:
            redis_server.resume()
        assert (await holder).status_code == 200
        metrics = (await service.get("/metrics")).text

        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.headers["content-type"] == "application/json"
        assert shed.json() == {"detail": "overloaded: try again shortly"}
        assert redis_server.command_counts().get("mget") == 1, "the shed request read nothing"
        assert sim.stats()["calls"]["contacts"] == 1, "nor asked for its page: only the holder"
        assert 'http_requests_total{method="GET",route="/contacts",status="503"}' in metrics
        assert _metric(metrics, "admission_shed_total") >= 1
        assert (admission.active, admission.queued) == (0, 0)
