"""docs/operations.md "Metrics": Prometheus metrics that move with traffic, and the request log.

Metrics are read the way Prometheus reads them, from `GET /metrics`; logs the
way a log shipper reads them, from the stdout of a real service process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from app.logging import configure_logging
from simupstream.app import Failure
from tests.conftest import Service, Sim, StartService
from tests.support.procs import RedisServer, eventually
from tests.support.replicas import (
    ServiceProcess,
    clean_env,
    parse_metrics,
    sample,
    scrape,
    service_env,
)

PAGE = "/contacts?instance=acme&per_page=20"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def unique_ids(body: dict[str, Any]) -> tuple[int, int]:
    """How many distinct customers and users a page references."""
    customers = {c["customerId"] for c in body["data"] if c["customerId"] is not None}
    users = {c["userId"] for c in body["data"] if c["userId"] is not None}
    return len(customers), len(users)


async def metrics_of(service: Service) -> Samples:
    response = await service.get("/metrics")
    assert response.status_code == 200
    return parse_metrics(response.text)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


async def stored(redis: RedisServer, keys: int) -> None:
    client = redis.client()
    await eventually(
        lambda: sum(1 for _ in client.scan_iter(match="[cu]*:*", count=1000)) >= keys,
        message=f"{keys} entities stored in Redis",
    )


async def lines_until(service: ServiceProcess, event: str, count: int) -> list[dict[str, Any]]:
    await eventually(lambda: len(service.events(event)) >= count, message=f"{count} {event}")
    return service.log_lines()


# ------------------------------------------------------------------------------ metrics


class TestMetricsMoveWithTraffic:
    async def test_metrics_endpoint_serves_every_spec_metric_as_prometheus_text(
        self, service: Service
    ) -> None:
        await service.get(PAGE)
        response = await service.get("/metrics")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        for name, kind in [
            ("cache_hits_total", "counter"),
            ("cache_misses_total", "counter"),
            ("upstream_requests_total", "counter"),
            ("upstream_request_duration_seconds", "histogram"),
            ("redis_errors_total", "counter"),
            ("redis_up", "gauge"),
            ("redis_circuit_open", "gauge"),
            ("http_request_duration_seconds", "histogram"),
            ("crm_batch_size", "histogram"),
        ]:
            assert f"# TYPE {name} {kind}" in response.text, name

    async def test_a_cold_page_counts_misses_and_a_warm_one_hits_per_entity(
        self, service: Service
    ) -> None:
        before = await metrics_of(service)
        cold = await service.get(PAGE)
        await service.settle()
        await service.get(PAGE)
        after = await metrics_of(service)
        customers, users = unique_ids(cold.json())

        assert delta(after, before, "cache_misses_total", entity="customer") == customers
        assert delta(after, before, "cache_misses_total", entity="user") == users
        assert delta(after, before, "cache_hits_total", entity="customer") == customers
        assert delta(after, before, "cache_hits_total", entity="user") == users

    async def test_upstream_calls_are_counted_and_timed_by_api_and_outcome(
        self, service: Service, sim: Sim
    ) -> None:
        before = await metrics_of(service)
        sim.state.fail["customers"] = Failure(status=500, times=1)
        failed = await service.get(PAGE)
        await service.settle()
        await service.get(PAGE)  # the customers again, the users from Redis
        after = await metrics_of(service)

        assert failed.headers["x-enrichment"] == "partial"
        assert delta(after, before, "upstream_requests_total", api="whatsapp", outcome="ok") == 2
        assert (
            delta(after, before, "upstream_requests_total", api="crm_customers", outcome="http_5xx")
            == 1
        )
        assert (
            delta(after, before, "upstream_requests_total", api="crm_customers", outcome="ok") == 1
        )
        assert delta(after, before, "upstream_requests_total", api="crm_users", outcome="ok") == 1
        assert delta(after, before, "upstream_request_duration_seconds_count", api="whatsapp") == 2
        assert (
            delta(after, before, "upstream_request_duration_seconds_count", api="crm_customers")
            == 2
        )
        assert delta(after, before, "upstream_request_duration_seconds_sum", api="whatsapp") > 0

    async def test_request_duration_histogram_counts_requests_by_route_template(
        self, service: Service
    ) -> None:
        before = await metrics_of(service)
        for _ in range(3):
            await service.get(PAGE)
        await service.get("/no/such/path/12345")
        after = await metrics_of(service)

        assert (
            delta(
                after,
                before,
                "http_request_duration_seconds_count",
                method="GET",
                route="/contacts",
            )
            == 3
        )
        assert (
            delta(
                after, before, "http_requests_total", method="GET", route="/contacts", status="200"
            )
            == 3
        )
        assert (
            delta(
                after, before, "http_requests_total", method="GET", route="unmatched", status="404"
            )
            == 1
        )
        assert not any("12345" in str(labels) for _, labels in after), "no raw path as a label"

    async def test_redis_errors_count_and_redis_up_follows_an_outage(
        self, start_service: StartService, redis_server: RedisServer
    ) -> None:
        service = await start_service(
            redis_timeout_seconds=0.25, redis_breaker_cooldown_seconds=0.3
        )
        await service.get(PAGE)
        before = await metrics_of(service)
        assert sample(before, "redis_up") == 1

        redis_server.kill()
        for _ in range(3):
            assert (await service.get(PAGE)).status_code == 200
        during = await metrics_of(service)

        assert delta(during, before, "redis_errors_total") >= 3
        assert sample(during, "redis_up") == 0
        assert sample(during, "redis_circuit_open") == 1

        redis_server.start()

        async def redis_up_again() -> bool:
            await service.get(PAGE)
            after = await metrics_of(service)
            return sample(after, "redis_up") == 1 and sample(after, "redis_circuit_open") == 0

        await eventually(redis_up_again, timeout=10, interval=0.1, message="redis_up back to 1")


class TestMetricsOverSeveralWorkers:
    """`python -m app --workers 2` with PROMETHEUS_MULTIPROC_DIR: any worker's /metrics sums all."""

    @pytest.fixture
    def two_workers(
        self, sim: Sim, redis_server: RedisServer, tmp_path: Path
    ) -> Iterator[ServiceProcess]:
        env = service_env(sim.url, redis_server, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
        # `python -m app` logs uvicorn's own lines (the supervisor's too) as JSON.
        service = ServiceProcess(env, workers=2, workdir=tmp_path / "service")
        yield service.start()
        service.stop()

    async def drive_until_both_workers_served(self, service: ServiceProcess) -> int:
        """Warm requests on fresh connections until each worker answered some; how many."""
        sent = 0
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=service.url, timeout=10, limits=fresh) as client:
            while sent < 400:
                batch = await asyncio.gather(*(client.get(PAGE) for _ in range(20)))
                assert all(r.status_code == 200 for r in batch)
                sent += len(batch)
                await lines_until(service, "request", sent + 1)  # and the cold request
                if len(Counter(line["pid"] for line in service.events("request"))) == 2:
                    return sent
        raise AssertionError("one worker answered every request")

    async def test_counters_are_the_sum_over_both_workers_whichever_answers_the_scrape(
        self, two_workers: ServiceProcess, redis_server: RedisServer
    ) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            cold = await client.get(two_workers.url + PAGE)
        customers, users = unique_ids(cold.json())
        await stored(redis_server, customers + users)

        warm = await self.drive_until_both_workers_served(two_workers)
        per_worker = Counter(line["pid"] for line in two_workers.events("request"))
        scrapes = [await asyncio.to_thread(scrape, two_workers.url) for _ in range(6)]

        assert set(per_worker) == two_workers.worker_pids()
        assert sum(per_worker.values()) == warm + 1
        for samples in scrapes:
            served = sample(
                samples, "http_requests_total", method="GET", route="/contacts", status="200"
            )
            assert served == warm + 1
            assert sample(samples, "cache_misses_total", entity="customer") == customers
            assert sample(samples, "cache_hits_total", entity="customer") == warm * customers
            assert sample(samples, "cache_hits_total", entity="user") == warm * users
            assert (
                sample(samples, "upstream_requests_total", api="whatsapp", outcome="ok") == warm + 1
            )
            assert (
                sample(samples, "upstream_requests_total", api="crm_customers", outcome="ok") == 1
            )
            assert (
                sample(
                    samples,
                    "http_request_duration_seconds_count",
                    method="GET",
                    route="/contacts",
                )
                == warm + 1
            )
            assert sample(samples, "redis_up") == 1
            assert not [labels for name, labels in samples if name == "redis_up" and labels], (
                "one redis_up for the server, not one per worker"
            )

    async def test_a_killed_workers_counts_stay_and_its_gauges_go(
        self, two_workers: ServiceProcess, tmp_path: Path
    ) -> None:
        async with httpx.AsyncClient(base_url=two_workers.url, timeout=10) as client:
            for _ in range(10):
                assert (await client.get(PAGE)).status_code == 200
        await eventually(lambda: len(two_workers.events("request")) == 10)
        before = await asyncio.to_thread(scrape, two_workers.url)
        busiest = Counter(line["pid"] for line in two_workers.events("request"))
        victim = busiest.most_common(1)[0][0]
        os.kill(victim, signal.SIGKILL)
        directory = tmp_path / "prom"

        async def replaced_and_forgotten() -> bool:
            # uvicorn starts a new worker; a scrape drops the dead one's gauges.
            samples = await asyncio.to_thread(scrape, two_workers.url)
            return (
                len(two_workers.worker_pids()) == 3
                and not list(directory.glob(f"gauge_*_{victim}.db"))
                and sample(samples, "redis_up") == 1
            )

        await eventually(replaced_and_forgotten, timeout=20, interval=0.2, message="replaced")
        after = await asyncio.to_thread(scrape, two_workers.url)

        assert list(directory.glob(f"counter_{victim}.db")), "its counters are kept"
        supervisor = {
            line["event"] for line in two_workers.log_lines() if line["pid"] == two_workers.pid
        }
        assert f"Child process [{victim}] died" in supervisor, "the supervisor logs JSON too"
        assert two_workers.errors() == ""
        for name, labels in [
            ("http_requests_total", {"method": "GET", "route": "/contacts", "status": "200"}),
            ("cache_hits_total", {"entity": "customer"}),
            ("upstream_requests_total", {"api": "whatsapp", "outcome": "ok"}),
        ]:
            assert sample(after, name, **labels) == sample(before, name, **labels) > 0, name


# ------------------------------------------------------------------------------ logs

ADMIN_TOKEN = "adm-7Yq2vZt9Lk4Rr8Wd"
CRM_TOKEN = "crm-Hs3Jp0Xe6Nb1Qc5U"
CALLER_TOKEN = "caller-Mf8Gt2Ka9Pv4Ls7B"
WRONG_TOKEN = "wrong-Zr5Dn1Cy6Hx3Ow0E"
LIFECYCLE_LOGGERS = {"uvicorn.error", "app.lifespan"}


@pytest.fixture
def logged_service(sim: Sim, redis_server: RedisServer, tmp_path: Path) -> Iterator[ServiceProcess]:
    env = service_env(sim.url, redis_server, ADMIN_TOKEN=ADMIN_TOKEN, CRM_API_TOKEN=CRM_TOKEN)
    service = ServiceProcess(env, workdir=tmp_path)
    yield service.start()
    service.stop()


class TestRequestLog:
    async def test_each_request_writes_one_json_line_with_what_it_cost(
        self, logged_service: ServiceProcess, redis_server: RedisServer
    ) -> None:
        async with httpx.AsyncClient(base_url=logged_service.url, timeout=10) as client:
            cold = await client.get(PAGE, headers={"x-request-id": "cold-1"})
            customers, users = unique_ids(cold.json())
            await stored(redis_server, customers + users)
            warm = await client.get(PAGE, headers={"x-request-id": "warm-1"})
        lines = await lines_until(logged_service, "request", 2)
        by_id = {line["request_id"]: line for line in lines if line["event"] == "request"}

        assert cold.headers["x-request-id"] == "cold-1"
        assert warm.headers["x-request-id"] == "warm-1"
        assert by_id["cold-1"] == by_id["cold-1"] | {
            "method": "GET",
            "path": "/contacts",
            "instance": "acme",
            "status": 200,
            "cache_hits": 0,
            "cache_misses": customers + users,
            "crm_calls": 2,
            "level": "info",
            "logger": "app.access",
        }
        assert isinstance(by_id["cold-1"]["duration_ms"], float)
        assert by_id["cold-1"]["duration_ms"] > 0
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", by_id["cold-1"]["timestamp"])
        assert by_id["warm-1"]["cache_hits"] == customers + users
        assert (by_id["warm-1"]["cache_misses"], by_id["warm-1"]["crm_calls"]) == (0, 0)
        assert len([line for line in lines if line["event"] == "request"]) == 2

    async def test_request_id_is_generated_when_absent_or_unsafe_and_echoed(
        self, logged_service: ServiceProcess
    ) -> None:
        async with httpx.AsyncClient(base_url=logged_service.url, timeout=10) as client:
            generated = await client.get("/contacts?instance=BAD")
            unsafe = await client.get("/contacts?instance=BAD", headers={"x-request-id": "a b\tc"})
        lines = await lines_until(logged_service, "request", 2)
        logged = [line["request_id"] for line in lines if line["event"] == "request"]

        assert generated.status_code == unsafe.status_code == 422
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
        assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
        assert logged == [generated.headers["x-request-id"], unsafe.headers["x-request-id"]]

    async def test_every_line_a_request_emits_carries_its_request_id(
        self, logged_service: ServiceProcess, sim: Sim
    ) -> None:
        sim.state.fail["customers"] = Failure(status=503)
        async with httpx.AsyncClient(base_url=logged_service.url, timeout=10) as client:
            response = await client.get(PAGE + "&badids=1", headers={"x-request-id": "req-42"})
        lines = await lines_until(logged_service, "request", 1)
        during = [line for line in lines if line.get("logger") not in LIFECYCLE_LOGGERS]
        events = {line["event"] for line in during}

        assert response.headers["x-enrichment"] == "partial"
        assert {"contacts.invalid_ids", "crm.batch_failed", "request"} <= events
        assert {line.get("request_id") for line in during} == {"req-42"}

    async def test_uvicorn_lines_go_through_the_same_json_pipeline(
        self, logged_service: ServiceProcess
    ) -> None:
        logged_service.stop()
        lines = logged_service.log_lines()  # every line parses as JSON, or this fails
        uvicorn = {line["event"]: line for line in lines if line["logger"] == "uvicorn.error"}

        assert {"Application startup complete.", "Shutting down"} <= set(uvicorn)
        assert any(event.startswith("Started server process") for event in uvicorn)
        for line in uvicorn.values():
            assert line["level"] == "info"
            assert {"timestamp", "pid"} <= set(line)
        assert [line["event"] for line in lines if line["logger"] == "app.lifespan"] == [
            "service.start",
            "service.stop",
        ]
        assert logged_service.errors() == "", "nothing on stderr"

    async def test_console_format_renders_lines_for_people(
        self, sim: Sim, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        env = service_env(sim.url, redis_server, LOG_FORMAT="console")
        service = ServiceProcess(env, workdir=tmp_path).start()
        try:
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                await client.get(PAGE, headers={"x-request-id": "console-1"})
            await eventually(lambda: "console-1" in service.output())
        finally:
            service.stop()
        line = next(line for line in service.output().splitlines() if "console-1" in line)

        assert not line.startswith("{")
        assert "\x1b[" not in line, "no colour codes when stdout is not a terminal"
        assert re.search(r"\[info\s*\] request\b", line)
        for field in ("request_id=console-1", "status=200", "instance=acme", "path=/contacts"):
            assert field in line


class TestNoSecretIsLogged:
    async def test_tokens_and_authorization_headers_never_reach_the_output(
        self, sim: Sim, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        env = service_env(
            sim.url,
            redis_server,
            ADMIN_TOKEN=ADMIN_TOKEN,
            CRM_API_TOKEN=CRM_TOKEN,
            LOG_LEVEL="debug",  # the most a process ever writes
        )
        service = ServiceProcess(env, workdir=tmp_path).start()
        caller = {"authorization": f"Bearer {CALLER_TOKEN}"}
        try:
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                assert (await client.get(PAGE, headers=caller)).status_code == 200
                sim.state.fail["users"] = Failure(status=500, body=f"echo {CRM_TOKEN}")
                await client.get("/contacts?instance=globex&badids=1", headers=caller)
                sim.state.fail["contacts"] = Failure(status=401)
                assert (await client.get(PAGE, headers=caller)).status_code == 401
                for token in (ADMIN_TOKEN, WRONG_TOKEN):
                    await client.delete(
                        "/cache/acme/customers/1", headers={"authorization": f"Bearer {token}"}
                    )
                await client.get("/cache/acme/stats", headers={"authorization": WRONG_TOKEN})
                await client.get(f"/nope?token={CALLER_TOKEN}", headers=caller)
        finally:
            service.stop()
        output = service.output() + service.errors()

        assert sim.stats()["last_headers"]["customers"]["authorization"] == f"Bearer {CRM_TOKEN}"
        assert len([r for r in service.events("request") if r["path"] != "/health"]) == 7
        assert any(line["level"] == "debug" for line in service.log_lines())
        for secret in (ADMIN_TOKEN, CRM_TOKEN, CALLER_TOKEN, WRONG_TOKEN):
            assert secret not in output


class TestUnhandledErrors:
    async def test_an_unexpected_exception_is_a_json_500_with_the_request_id_and_one_log_line(
        self, start_service: StartService, caplog: pytest.LogCaptureFixture
    ) -> None:
        service = await start_service()

        async def broken() -> None:
            raise RuntimeError("a bug")

        service.app.add_api_route("/broken", broken)
        with caplog.at_level(logging.WARNING):
            response = await service.get("/broken", headers={"x-request-id": "bug-1"})
            again = await service.get("/health")
        logged = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
        request_lines = [m for m in logged if m.get("event") == "request"]

        assert response.status_code == 500
        assert response.json() == {"detail": "internal error"}
        assert response.headers["x-request-id"] == "bug-1"
        assert again.status_code == 200, "the server keeps serving"
        assert len(request_lines) == 1
        assert request_lines[0]["request_id"] == "bug-1"
        assert request_lines[0]["status"] == 500
        assert "RuntimeError: a bug" in request_lines[0]["exception"]  # the traceback, rendered


class TestRedaction:
    """The logging pipeline itself masks credentials, whatever a caller passes it."""

    @pytest.fixture
    def captured(self) -> Iterator[io.StringIO]:
        stream = io.StringIO()
        configure_logging("info", "json", secrets=[CRM_TOKEN, ADMIN_TOKEN, "", None])
        handler = next(h for h in logging.getLogger().handlers if h.get_name() == "app.logging")
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        yield stream
        configure_logging("warning", "json")  # what the other tests run with

    def test_secret_values_and_credentials_are_masked_in_every_field(
        self, captured: io.StringIO
    ) -> None:
        log = structlog.get_logger("tests.redaction")
        log.warning(
            "crm.rejected",
            error=f"401 for Bearer {CALLER_TOKEN}",
            url="https://svc:hunter2@crm.example/acme/customers",
            authorization=f"Bearer {CALLER_TOKEN}",
            crm_api_token=CRM_TOKEN,
            nested={"detail": [f"admin {ADMIN_TOKEN}"]},
        )
        logging.getLogger("some.library").warning("retrying with %s", CRM_TOKEN)
        try:
            raise ValueError(f"token {ADMIN_TOKEN} rejected")
        except ValueError:
            log.exception("admin.failed")
        lines = [json.loads(line) for line in captured.getvalue().splitlines()]
        output = captured.getvalue()

        assert [line["event"] for line in lines] == [
            "crm.rejected",
            "retrying with [redacted]",
            "admin.failed",
        ]
        for secret in (CRM_TOKEN, ADMIN_TOKEN, CALLER_TOKEN, "hunter2"):
            assert secret not in output
        assert lines[0]["authorization"] == lines[0]["crm_api_token"] == "[redacted]"
        assert lines[0]["error"] == "401 for Bearer [redacted]"
        assert lines[0]["url"] == "https://[redacted]@crm.example/acme/customers"
        assert lines[0]["nested"] == {"detail": ["admin [redacted]"]}
        assert "ValueError: token [redacted] rejected" in lines[2]["exception"]

    def test_ordinary_text_is_left_alone(self, captured: io.StringIO) -> None:
        structlog.get_logger("tests.redaction").warning(
            "basic setup of the bearer service", url="http://crm.example/a?email=x@y.z"
        )
        line = json.loads(captured.getvalue())

        assert line["event"] == "basic setup of the bearer service"
        assert line["url"] == "http://crm.example/a?email=x@y.z"

    def test_a_lowercase_bearer_token_is_masked_too(self, captured: io.StringIO) -> None:
        structlog.get_logger("tests.redaction").warning("header", value=f"bearer {CALLER_TOKEN}")

        assert json.loads(captured.getvalue())["value"] == "bearer [redacted]"


class TestMultiprocessSwitch:
    """prometheus-client picks its mode at import, from PROMETHEUS_MULTIPROC_DIR."""

    def python(self, workdir: Path, directory: str | None, script: str) -> str:
        env = clean_env({} if directory is None else {"PROMETHEUS_MULTIPROC_DIR": directory})
        result = subprocess.run(
            [sys.executable, "-c", f"import app.metrics as m; {script}"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout

    def count_a_hit(self, workdir: Path, directory: str | None) -> str:
        return self.python(
            workdir,
            directory,
            "m.CACHE_HITS.labels(entity='customer').inc(); print(m.MULTIPROCESS)",
        ).strip()

    def test_an_empty_directory_variable_means_one_process_and_writes_no_files(
        self, tmp_path: Path
    ) -> None:
        assert self.count_a_hit(tmp_path, "") == "False"
        assert self.count_a_hit(tmp_path, None) == "False"
        assert list(tmp_path.iterdir()) == []

    def test_a_missing_directory_is_created_and_gauges_go_when_the_process_exits(
        self, tmp_path: Path
    ) -> None:
        directory = tmp_path / "not" / "yet"

        assert self.count_a_hit(tmp_path, str(directory)) == "True"
        files = [p.name for p in directory.iterdir()]
        exposition = self.python(tmp_path, str(directory), "print(m.render()[0].decode())")

        assert [name.split("_")[0] for name in files] == ["counter"], files
        assert sample(parse_metrics(exposition), "cache_hits_total", entity="customer") == 1
