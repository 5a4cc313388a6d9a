"""The monitoring that ships with the service (deploy/monitoring/, docs/monitoring.md).

The files are checked by the tools that will read them (promtool's config,
rules and unit tests; docker compose), the dashboard by its structure, and
the whole by a real Prometheus and a real redis_exporter scraping the real
service, Redis and the simulated upstream: every dashboard query and rule
expression goes through Prometheus's HTTP API, and the alerts for an open
breaker and a failing CRM fire when those are provoked and resolve after.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml

from app import metrics
from tests.support.monitoring import (
    DASHBOARD,
    GRAFANA_PROVISIONING,
    PROMETHEUS_CONFIG,
    RULE_FILES,
    RULE_TESTS,
    PrometheusProcess,
    RedisExporterProcess,
    alerts,
    binary,
    compress_expr,
    compressed_rules,
    rules,
)
from tests.support.procs import RedisServer, eventually
from tests.support.replicas import ROOT, ServiceProcess, SimProcess

DOCS = ROOT / "docs" / "monitoring.md"
COMPOSE_FILE = ROOT / "docker-compose.yml"
MONITORING_SERVICES = {"prometheus", "grafana", "redis-exporter"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    slugs = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            slugs.add(text.replace(" ", "-"))
    return slugs


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


# ------------------------------------------------------------------- the shipped files


class TestPrometheusFiles:
    def test_promtool_accepts_the_config_and_its_rule_files(self) -> None:
        result = promtool("check", "config", str(PROMETHEUS_CONFIG))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{len(RULE_FILES)} rule files found" in result.stdout

    def test_promtool_accepts_every_rule_file(self) -> None:
        result = promtool("check", "rules", *map(str, RULE_FILES))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_promtool_unit_tests_of_the_alerts_pass(self) -> None:
        result = promtool("test", "rules", str(RULE_TESTS))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent(self) -> None:
        cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
        fired: set[str] = set()
        silent: set[str] = set()
        for case in cases:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
        names = {rule["alert"] for rule in alerts()}
        assert names - fired == set(), "alerts never shown to fire"
        assert names - silent == set(), "alerts never shown to stay silent"

    def test_scrapes_every_api_replica_by_dns_redis_exporter_and_itself(self) -> None:
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}

        assert set(jobs) == {"enriched-contacts", "redis", "prometheus"}
        (dns,) = jobs["enriched-contacts"]["dns_sd_configs"]
        assert dns["names"] == ["api"]
        assert dns["type"] == "A"
        assert dns["port"] == 8000
        assert jobs["redis"]["static_configs"][0]["targets"] == ["redis-exporter:9121"]
        assert jobs["prometheus"]["static_configs"][0]["targets"] == ["localhost:9090"]

    def test_every_alert_says_what_happened_and_links_to_its_runbook_section(self) -> None:
        sections = anchors(DOCS.read_text())
        for rule in alerts():
            notes = rule.get("annotations", {})
            assert notes.get("summary"), rule["alert"]
            assert notes.get("description"), rule["alert"]
            assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
            page, _, anchor = notes["runbook_url"].partition("#")
            assert page == "docs/monitoring.md", rule["alert"]
            assert anchor in sections, f"{rule['alert']}: no section #{anchor} in {DOCS.name}"

    def test_objectives_are_one_recorded_number_each(self) -> None:
        objectives = {
            rule["labels"]["slo"]: float(re.sub(r"vector\((.*)\)", r"\1", rule["expr"]))
            for rule in rules()
            if rule.get("record") == "slo:objective:ratio"
        }
        assert objectives == {"contacts-availability": 0.999, "contacts-latency": 0.99}

    def test_latency_objective_threshold_is_a_bucket_of_the_request_histogram(self) -> None:
        latency = [
            rule["expr"]
            for rule in rules()
            if rule.get("labels", {}).get("slo") == "contacts-latency" and "record" in rule
        ]
        thresholds = {m for expr in latency for m in re.findall(r'le="([^"]+)"', expr)}

        assert thresholds == {"0.25"}
        assert 0.25 in metrics.HTTP_DURATION._upper_bounds

    def test_burn_rate_alerts_use_the_workbook_windows_and_factors(self) -> None:
        by_name = {rule["alert"]: rule["expr"] for rule in alerts()}
        for slo in ("Availability", "Latency"):
            fast = by_name[f"Contacts{slo}BudgetBurnFast"]
            slow = by_name[f"Contacts{slo}BudgetBurnSlow"]
            assert re.findall(r"ratio_rate(\w+)\{", fast) == ["1h", "5m", "6h", "30m"]
            assert re.findall(r"\(([\d.]+) \* \(1 - slo", fast) == ["14.4", "14.4", "6", "6"]
            assert re.findall(r"ratio_rate(\w+)\{", slow) == ["1d", "2h", "3d", "6h"]
            assert re.findall(r"\(([\d.]+) \* \(1 - slo", slow) == ["3", "3", "1", "1"]

    def test_compressed_copy_for_the_live_test_changes_only_durations(self) -> None:
        for path in RULE_FILES:
            shipped = yaml.safe_load(path.read_text())
            copy = compressed_rules(path, factor=30, floor=4)
            for group, fast in zip(shipped["groups"], copy["groups"], strict=True):
                for rule, short in zip(group["rules"], fast["rules"], strict=True):
                    no_durations = re.compile(r"(?<![\w.])(\d+(ms|s|m|h|d|w|y))+(?!\w)")
                    assert no_durations.sub("D", rule["expr"]) == no_durations.sub(
                        "D", short["expr"]
                    )
                    assert {k: v for k, v in rule.items() if k not in ("expr", "for")} == {
                        k: v for k, v in short.items() if k not in ("expr", "for")
                    }
        assert (
            compress_expr("rate(x_rate5m[5m] offset 1h)", 30, 4)
            == "rate(x_rate5m[10s] offset 120s)"
        )
        assert compress_expr("max_over_time(x[1m])", 30, 4) == "max_over_time(x[4s])"


class TestDashboard:
    def test_is_the_output_of_its_generator(self) -> None:
        result = subprocess.run(
            [sys.executable, "scripts/build_dashboard.py", "--check"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr

    def test_every_panel_and_query_uses_the_provisioned_data_source(self) -> None:
        provisioned = yaml.safe_load(
            (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
        )
        (source,) = provisioned["datasources"]
        expected = {"type": "prometheus", "uid": source["uid"]}

        for panel in query_panels():
            assert panel["datasource"] == expected, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == expected, panel["title"]
        for variable in dashboard()["templating"]["list"]:
            assert variable["datasource"] == expected, variable["name"]

    def test_panel_ids_are_unique_and_every_panel_has_a_query(self) -> None:
        panels = dashboard()["panels"]
        ids = [panel["id"] for panel in panels]

        assert len(ids) == len(set(ids))
        for panel in query_panels():
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]

    def test_panels_do_not_overlap(self) -> None:
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard()["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, panel["title"]
            for x, y in itertools.product(
                range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
            ):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]

    def test_has_job_and_replica_variables(self) -> None:
        variables = {v["name"]: v for v in dashboard()["templating"]["list"]}

        assert {"job", "instance", "redis_job"} <= set(variables)
        assert variables["instance"]["includeAll"]
        assert variables["instance"]["allValue"] == ".+"
        service_queries = [
            target["expr"]
            for panel in query_panels()
            for target in panel["targets"]
            if "redis_job" not in target["expr"] and target["expr"] != "slo:objective:ratio"
        ]
        assert all('job=~"$job"' in expr for expr in service_queries)

    @pytest.mark.parametrize(
        "metric",
        [
            "http_requests_total",
            "http_request_duration_seconds_bucket",
            "contacts_enrichment_total",
            "cache_hits_total",
            "cache_misses_total",
            "cache_stale_served_total",
            "cache_refresh_ahead_total",
            "redis_round_trips_total",
            "redis_errors_total",
            "redis_circuit_open",
            "upstream_requests_total",
            "upstream_request_duration_seconds_bucket",
            "crm_ids_fetched_total",
            "admission_active",
            "admission_queued",
            "admission_shed_total",
            "redis_memory_used_bytes",
            "redis_evicted_keys_total",
            "redis_connected_clients",
            "redis_commands_processed_total",
        ],
    )
    def test_shows_what_the_issue_asks_for(self, metric: str) -> None:
        exprs = " ".join(t["expr"] for p in query_panels() for t in p["targets"])
        assert re.search(rf"\b{metric}\b", exprs)

    def test_provisioning_loads_the_dashboard_directory(self) -> None:
        provider = yaml.safe_load(
            (GRAFANA_PROVISIONING / "dashboards" / "enriched-contacts.yml").read_text()
        )["providers"][0]
        compose = yaml.safe_load(COMPOSE_FILE.read_text())
        mounts = compose["services"]["grafana"]["volumes"]

        assert f"./deploy/monitoring/grafana/dashboards:{provider['options']['path']}:ro" in mounts


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return loaded


class TestComposeProfile:
    def test_monitoring_services_are_in_the_monitoring_profile_only(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        profiled = {name for name, svc in services.items() if svc.get("profiles")}

        assert profiled == MONITORING_SERVICES
        for name in MONITORING_SERVICES:
            assert services[name]["profiles"] == ["monitoring"]

    @pytest.mark.parametrize("name", sorted(MONITORING_SERVICES))
    def test_images_are_pinned_to_a_version(
        self, services: dict[str, dict[str, Any]], name: str
    ) -> None:
        image = services[name]["image"]
        _, _, tag = image.rpartition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), image

    @pytest.mark.parametrize("name", ["prometheus", "grafana"])
    def test_ports_are_published_on_loopback_by_default(
        self, services: dict[str, dict[str, Any]], name: str
    ) -> None:
        for port in services[name]["ports"]:
            assert str(port).startswith("${MONITORING_BIND:-127.0.0.1}:"), port
        assert not services["redis-exporter"].get("ports")

    def test_grafana_is_read_only_for_anonymous_visitors_with_no_default_password(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        grafana = services["grafana"]
        env = grafana["environment"]
        script = " ".join(grafana["entrypoint"])

        assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
        assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
        assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # set by the entrypoint only
        assert env["GRAFANA_ADMIN_PASSWORD"] is None  # passed through from the shell, no default
        assert "$${GRAFANA_ADMIN_PASSWORD:-$$(head -c 24 /dev/urandom" in script
        assert script.rstrip().endswith("exec /run.sh")

    def test_prometheus_mounts_the_shipped_config_and_rules(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        prometheus = services["prometheus"]

        assert "./deploy/monitoring/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
        assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
        assert services["redis-exporter"]["environment"]["REDIS_ADDR"] == "redis://redis:6379"

    def test_docker_compose_accepts_the_profile(self) -> None:
        version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if version.returncode != 0:
            pytest.skip("no Docker Compose v2 CLI here")
        result = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), "--profile", "monitoring", "config"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        rendered = yaml.safe_load(result.stdout)["services"]
        assert set(rendered) >= MONITORING_SERVICES
        for name in MONITORING_SERVICES:
            assert all(p["host_ip"] == "127.0.0.1" for p in rendered[name].get("ports", []))


# ------------------------------------------------------------------------ a live Prometheus

# The live test's Prometheus runs the shipped rules with every duration divided
# by this (5m windows become 10 s, `for: 2m` 4 s), never under 4 s: at one
# scrape a second a shorter window would hold too few samples for rate().
TIME_FACTOR = 30
TIME_FLOOR = 4
ADMIN_TOKEN = "monitoring-test-token"


def grafana_to_promql(expr: str, *, rate_interval: str = "10s") -> str:
    """A dashboard query as Grafana sends it with every job and replica selected."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$redis_job", "redis")
        .replace("$job", "enriched-contacts")
        .replace("$instance", ".+")
    )


class Stack:
    """Redis, the simulator, two service replicas, redis_exporter and Prometheus, on loopback."""

    def __init__(self, redis: RedisServer, sim: SimProcess, replicas: list[ServiceProcess]):
        self.redis = redis
        self.sim = sim
        self.replicas = replicas
        self.exporter = RedisExporterProcess(redis.url)
        self.prometheus = PrometheusProcess()

    def start(self) -> Stack:
        self.exporter.start()
        shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        targets = {
            "enriched-contacts": [r.url.removeprefix("http://") for r in self.replicas],
            "redis": [self.exporter.target],
            "prometheus": [self.prometheus.target],
        }
        scrape_configs = []
        for job in shipped["scrape_configs"]:
            local = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
            local["static_configs"] = [{"targets": targets[job["job_name"]]}]
            scrape_configs.append(local)
        every_second = {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        }
        config = {"global": every_second, "scrape_configs": scrape_configs}
        self.prometheus.start(
            config,
            {p.name: compressed_rules(p, TIME_FACTOR, TIME_FLOOR) for p in RULE_FILES},
        )
        return self

    def stop(self) -> None:
        self.prometheus.stop()
        self.exporter.stop()

    def fail_crm(self, failing: bool) -> None:
        spec = {"status": 500} if failing else None
        httpx.put(
            f"{self.sim.url}/_sim/config",
            json={"fail": {"customers": spec, "users": spec}},
            timeout=5,
        ).raise_for_status()

    def fail_contacts(self, times: int) -> None:
        httpx.put(
            f"{self.sim.url}/_sim/config",
            json={"fail": {"contacts": {"status": 500, "times": times}}},
            timeout=5,
        ).raise_for_status()

    def alert_states(self, name: str) -> set[str]:
        """The states of `name` in the ALERTS series now (empty once resolved)."""
        series = self.prometheus.query(f'ALERTS{{alertname="{name}"}}')
        return {s["metric"]["alertstate"] for s in series}


class Load:
    """A mixed, bounded load over the replicas until stopped: warm pages (the same few
    again and again), cold pages (a new page each time), an unknown instance, a bad
    instance name and an admin invalidation now and then."""

    def __init__(self, replicas: list[ServiceProcess]) -> None:
        self.urls = itertools.cycle([r.url for r in replicas])
        self.statuses: dict[str, int] = {}
        self.enrichment: dict[str, int] = {}
        self._cold = itertools.count(10)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, workers: int = 2) -> None:
        self._tasks = [asyncio.create_task(self._run(n)) for n in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, worker: int) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(timeout=30) as client:
            for n in itertools.count():
                if self._stop.is_set() or n > 100_000:
                    return
                base = next(self.urls)
                if n % 10 == 9:
                    path = "/contacts?instance=unknown-tenant"
                elif n % 25 == 24:
                    path = "/contacts?instance=Not%20Valid"
                elif n % 4 == 3:
                    path = f"/contacts?instance=acme&per_page=20&page={next(self._cold)}"
                else:
                    path = f"/contacts?instance=acme&per_page=20&page={1 + n % 3}"
                response = await client.get(base + path)
                self._count(response)
                if n % 50 == 49:
                    await client.delete(f"{base}/cache/acme/customers/{worker}", headers=headers)
                await asyncio.sleep(0.02)

    def _count(self, response: httpx.Response) -> None:
        status = str(response.status_code)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        state = response.headers.get("x-enrichment")
        if state:
            self.enrichment[state] = self.enrichment.get(state, 0) + 1


@pytest.fixture
async def stack(redis_server: RedisServer) -> AsyncIterator[Stack]:
    sim = SimProcess(args=["--latency-ms", "contacts=2,customers=5,users=5"]).start()
    env = {
        "WHATSAPP_API_URL": sim.url,
        "CRM_API_URL": sim.url,
        "REDIS_URL": redis_server.url,
        "LOG_LEVEL": "warning",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        # Short enough that warm entries are refreshed ahead, and served stale while
        # the CRM fails, within the test.
        "CACHE_TTL_SECONDS": "4",
        "CACHE_REFRESH_AHEAD_SECONDS": "3",
        "CACHE_STALE_SECONDS": "120",
        "REDIS_BREAKER_COOLDOWN_SECONDS": "1",
    }
    replicas = [ServiceProcess(env).spawn() for _ in range(2)]
    stack = Stack(redis_server, sim, replicas)
    try:
        for replica in replicas:
            replica.wait_ready()
        yield stack.start()
    finally:
        stack.stop()
        redis_server.resume()
        for replica in replicas:
            replica.stop()
        sim.stop()


@pytest.mark.slow
class TestLivePrometheus:
    async def test_every_query_is_accepted_dashboards_have_data_and_alerts_fire_and_resolve(
        self, stack: Stack
    ) -> None:
        prometheus = stack.prometheus
        started = time.time()
        await eventually(
            lambda: (
                all(t["health"] == "up" for t in prometheus.api("targets")["activeTargets"])
                and len(prometheus.api("targets")["activeTargets"]) == 4
            ),
            timeout=30,
            interval=0.5,
            message="Prometheus scraping both replicas, redis_exporter and itself",
        )
        load = Load(stack.replicas)
        load.start()
        try:
            # Warm and cold pages, 404s and 422s, and a few 502s from the contacts API.
            await asyncio.sleep(6)
            stack.fail_contacts(times=3)
            await asyncio.sleep(2)

            # A failing CRM: cold pages come back partial, expired warm ones stale.
            stack.fail_crm(True)
            await eventually(
                lambda: stack.alert_states("ContactsCrmFailing") == {"firing"},
                timeout=60,
                interval=0.5,
                message="ContactsCrmFailing firing",
            )
            stack.fail_crm(False)

            # A hung Redis (SIGSTOP): the breakers open, the exporter sees Redis down.
            stack.redis.pause()
            try:
                await eventually(
                    lambda: stack.alert_states("ContactsRedisCircuitOpen") == {"firing"},
                    timeout=45,
                    interval=0.5,
                    message="ContactsRedisCircuitOpen firing",
                )
                await eventually(
                    lambda: stack.alert_states("ContactsRedisDown") == {"firing"},
                    timeout=30,
                    interval=0.5,
                    message="ContactsRedisDown firing",
                )
            finally:
                stack.redis.resume()
            for name in ("ContactsRedisCircuitOpen", "ContactsRedisDown", "ContactsCrmFailing"):
                await eventually(
                    lambda name=name: stack.alert_states(name) == set(),
                    timeout=45,
                    interval=0.5,
                    message=f"{name} resolved",
                )
        finally:
            await load.stop()
        end = time.time()

        assert {"200", "404", "422", "502"} <= set(load.statuses), load.statuses
        assert {"complete", "partial", "stale"} <= set(load.enrichment), load.enrichment

        # Every rule expression as shipped (not the test's compressed copy) is valid PromQL.
        for rule in rules():
            prometheus.query(rule["expr"])

        # Every dashboard query over the test's time range: accepted, and most with data.
        empty = []
        queries = [
            (panel["title"], target["expr"])
            for panel in query_panels()
            for target in panel["targets"]
        ]
        annotation = dashboard()["annotations"]["list"][0]["expr"]
        queries.append(("annotations", annotation))
        for title, expr in queries:
            result = prometheus.query_range(grafana_to_promql(expr), started, end, "1s")
            if not result:
                empty.append(f"{title}: {expr}")
        with_data = 1 - len(empty) / len(queries)
        assert with_data >= 0.85, f"{with_data:.0%} of {len(queries)} with data; empty: {empty}"

        # The template variables list the jobs the panels select.
        for variable in dashboard()["templating"]["list"]:
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            selector, label = match.groups()
            values = prometheus.api(
                f"label/{label}/values", **{"match[]": grafana_to_promql(selector)}
            )
            assert values, variable["name"]
