"""Real Prometheus and redis_exporter processes, and the shipped monitoring files they load.

The processes are Debian's `prometheus` and `prometheus-redis-exporter`
(scripts/ensure-system-deps.sh installs them), each on a free loopback port
with its files in a directory of its own, like the other servers of
tests/support/replicas.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.procs import free_port
from tests.support.replicas import ROOT, _Subprocess, clean_env

MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TESTS = PROMETHEUS_DIR / "tests" / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "enriched-contacts.json"
GRAFANA_PROVISIONING = MONITORING / "grafana" / "provisioning"


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        raise RuntimeError(f"{name} is not installed (scripts/ensure-system-deps.sh installs it)")
    return path


# ------------------------------------------------------------------ rules in compressed time

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
# A PromQL duration (`5m`, `1h30m`), not a digit inside a name such as `ratio_rate5m`.
_DURATION = re.compile(r"(?<![\w.])((?:\d+(?:ms|s|m|h|d|w|y))+)(?!\w)")
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def seconds(duration: str) -> float:
    parts = _PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def compress(duration: str, factor: float, floor: float) -> str:
    """`duration` divided by `factor`, at least `floor` seconds, in whole seconds."""
    return f"{max(floor, round(seconds(duration) / factor)):.0f}s"


def compress_expr(expr: str, factor: float, floor: float) -> str:
    return _DURATION.sub(lambda m: compress(m.group(1), factor, floor), expr)


def compressed_rules(source: Path, factor: float, floor: float) -> dict[str, Any]:
    """The rule file `source` with every duration (range, offset, `for`) divided by `factor`.

    The only way the live test shortens the shipped rules: names, labels,
    annotations, thresholds and the shape of every expression stay as shipped,
    so what fires in the test is what fires in production, `factor` times sooner.
    """
    groups: dict[str, Any] = yaml.safe_load(source.read_text())
    result = copy.deepcopy(groups)
    for group in result["groups"]:
        if "interval" in group:
            group["interval"] = compress(group["interval"], factor, floor)
        for rule in group["rules"]:
            rule["expr"] = compress_expr(str(rule["expr"]), factor, floor)
            if "for" in rule:
                rule["for"] = compress(rule["for"], factor, floor)
    return result


def rules(paths: Sequence[Path] = RULE_FILES) -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the shipped rule files."""
    return [
        rule
        for path in paths
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


# ------------------------------------------------------------------------------- processes


class RedisExporterProcess(_Subprocess):
    """redis_exporter for one Redis; it gives up on Redis after `timeout` (a scrape reports
    `redis_up 0` instead of hanging on a paused server)."""

    name = "redis-exporter"

    def __init__(self, redis_url: str, *, timeout: str = "500ms") -> None:
        super().__init__()
        self.port = free_port()
        self.redis_url = redis_url
        self.timeout = timeout

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> RedisExporterProcess:
        args = ["-redis.addr", self.redis_url, "-web.listen-address", self.target]
        args += ["-connection-timeout", self.timeout]
        self._spawn([binary("prometheus-redis-exporter"), *args], clean_env())
        _wait_http(self, f"http://{self.target}/metrics", timeout)
        return self


class PrometheusProcess(_Subprocess):
    """Prometheus with a configuration and rule files written into its own directory."""

    name = "prometheus"

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(
        self, config: Mapping[str, Any], rule_files: Mapping[str, Any], timeout: float = 30.0
    ) -> PrometheusProcess:
        """`config` as prometheus.yml, its `rule_files` replaced by `rule_files` ({name: rules})."""
        rules_dir = self.workdir / "rules"
        rules_dir.mkdir(exist_ok=True)
        for name, content in rule_files.items():
            (rules_dir / name).write_text(yaml.safe_dump(dict(content), sort_keys=False))
        written = {**config, "rule_files": ["rules/*.yml"]}
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(written, sort_keys=False))
        self._spawn(
            [
                binary("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.target}",
                "--log.level=warn",
            ],
            clean_env(),
        )
        _wait_http(self, f"{self.url}/-/ready", timeout)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        self.http.close()
        return super().stop(timeout)

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/{path}: its `data`, or AssertionError with Prometheus's error."""
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {response.status_code} {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api(
            "query_range", query=expr, start=start, end=end, step=step
        )["result"]
        return result


def _wait_http(process: _Subprocess, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not process.running:
            raise process._failure("exited before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise process._failure(f"not ready after {timeout}s")
        time.sleep(0.1)
