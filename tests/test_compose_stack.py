"""docker-compose.yml for real: build the image, bring the stack up, use it, kill a replica.

Runs where a Docker engine and Compose v2 answer (`docker` on PATH); anywhere
else it skips with the reason. The stack is a project of its own (its own
name, network, volume and image tag, the load balancer on a free loopback
port), so it never touches a stack a developer already runs, and it is taken
down with its volumes whatever happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_port
from tests.support.replicas import parse_metrics, sample

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = 3
PAGE = "/contacts?instance=acme&per_page=20"
# Building the image the first time downloads every locked dependency.
UP_TIMEOUT = 900


def _run(
    args: list[str], timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _skip_reason() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no `docker` CLI on PATH"
    try:
        if _run([docker, "info"], timeout=20, check=False).returncode != 0:
            return "no Docker engine answers (`docker info` failed)"
        version = _run([docker, "compose", "version", "--short"], timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer within 20 s"
    if version.returncode != 0 or not version.stdout.strip().lstrip("v").startswith("2."):
        return "no Docker Compose v2 (`docker compose version`)"
    return None


@dataclass
class Stack:
    project: str
    files: list[str]
    lb_url: str
    timings: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("-f", path)]
        return _run(["docker", "compose", "-p", self.project, *files, *args], timeout=timeout)

    def containers(self, service: str) -> list[str]:
        out = self.compose("ps", "-q", service).stdout
        return sorted(line for line in out.splitlines() if line)

    def exec_get(self, container: str, url: str) -> str:
        script = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        return _run(["docker", "exec", container, "python", "-c", script]).stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    suffix = uuid.uuid4().hex[:8]
    project = f"ec-test-{suffix}"
    # The image under its own tag, so a concurrent build of another checkout
    # cannot swap it under this test (and this test cannot swap another's).
    override = tmp_path_factory.mktemp("compose") / "test-image.yml"
    image = f"enriched-contacts:test-{suffix}"
    override.write_text(f"services:\n  api:\n    image: {image}\n  upstream:\n    image: {image}\n")
    port = free_port()
    stack = Stack(
        project,
        [str(ROOT / "docker-compose.yml"), str(override)],
        f"http://127.0.0.1:{port}",
    )
    env_args = {"LB_BIND": "127.0.0.1", "LB_PORT": str(port)}
    started = time.monotonic()
    try:
        files = [arg for path in stack.files for arg in ("-f", path)]
        up = subprocess.run(
            ["docker", "compose", "-p", project, *files, "up", "-d", "--build", "--wait"],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT,
            cwd=ROOT,
            env={**_base_env(), **env_args},
        )
        stack.timings["build_and_up"] = time.monotonic() - started
        if up.returncode != 0:
            logs = subprocess.run(
                ["docker", "compose", "-p", project, *files, "logs", "--tail", "40"],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            pytest.fail(f"compose up failed:\n{up.stderr[-4000:]}\n{logs.stdout[-6000:]}")
        yield stack
    finally:
        downed = time.monotonic()
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180)
        _run(["docker", "image", "rm", image], check=False)
        stack.timings["down"] = time.monotonic() - downed
        print(f"\ncompose stack timings (s): {json.dumps(stack.timings)}")


def _base_env() -> dict[str, str]:
    import os

    # The stack's settings come from the compose file; nothing of the shell's
    # (ADMIN_TOKEN, LOG_LEVEL, CRM_API_TOKEN ...) leaks in.
    keep = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT")
    return {name: os.environ[name] for name in keep if name in os.environ}


def _contacts_served(stack: Stack, container: str) -> float:
    text = stack.exec_get(container, "http://127.0.0.1:8000/metrics")
    return sample(
        parse_metrics(text), "http_requests_total", method="GET", route="/contacts", status="200"
    )


class TestComposeStack:
    """In file order, on one stack: the last test kills a replica."""

    def test_every_service_is_up_and_healthy(self, stack: Stack) -> None:
        states = [
            json.loads(line)
            for line in stack.compose("ps", "--format", "json").stdout.splitlines()
            if line.strip()
        ]
        by_service: dict[str, list[str]] = {}
        for state in states:
            by_service.setdefault(state["Service"], []).append(state["Health"])
        assert sorted(by_service) == ["api", "lb", "redis", "upstream"]
        assert len(by_service["api"]) == REPLICAS
        # The simulator's health comes from the image's own probe, which must
        # find the simulator's port and endpoint, not the service's.
        assert all(h == "healthy" for healths in by_service.values() for h in healths), by_service

    def test_the_load_balancer_answers_health_with_redis_up(self, stack: Stack) -> None:
        response = httpx.get(f"{stack.lb_url}/health", timeout=10)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "redis": "up"}

    def test_contacts_are_enriched_through_the_load_balancer(self, stack: Stack) -> None:
        response = httpx.get(f"{stack.lb_url}{PAGE}", timeout=30)
        assert response.status_code == 200
        assert response.headers["x-enrichment"] == "complete"
        contacts = response.json()["data"]
        assert len(contacts) == 20
        for contact in contacts:
            if contact["customerId"] is not None:
                assert contact["customer"]["id"] == contact["customerId"]
            if contact["userId"] is not None:
                assert contact["user"]["id"] == contact["userId"]

    def test_every_replica_serves(self, stack: Stack) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(10 * REPLICAS):
                assert client.get(f"{stack.lb_url}{PAGE}").status_code == 200
        replicas = stack.containers("api")
        served = {container[:12]: _contacts_served(stack, container) for container in replicas}
        assert len(served) == REPLICAS
        assert all(count > 0 for count in served.values()), served

    def test_a_killed_replica_costs_no_failed_request(self, stack: Stack) -> None:
        load = _Load(f"{stack.lb_url}{PAGE}", clients=4)
        load.start()
        try:
            assert load.wait_for_requests(20, timeout=30), "no load through the balancer"
            victim = stack.containers("api")[0]
            killed_at = time.monotonic()
            _run(["docker", "kill", victim])
            # Past the DNS re-resolution (valid=10s) and a retry of the dead
            # replica (fail_timeout=5s).
            time.sleep(15)
        finally:
            load.stop()
        after = [r for r in load.results if r.started >= killed_at]
        failed = [r for r in load.results if r.status != 200]
        slowest = max(r.seconds for r in after)
        stack.timings["failover_requests"] = len(after)
        stack.timings["failover_slowest_s"] = round(slowest, 3)
        stack.timings["failover_errors"] = len(failed)
        assert len(after) > 50, f"only {len(after)} requests after the kill"
        assert not failed, failed[:5]
        # A dead replica costs a 250 ms connect timeout, not a second per attempt.
        assert slowest < 1.0, f"slowest request after the kill: {slowest:.3f} s"


@dataclass
class _Result:
    started: float
    seconds: float
    status: int | str


class _Load:
    """A few clients in threads, each sending requests one after the other until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.results: list[_Result] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.results) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _client(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                status: int | str
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError as error:
                    status = repr(error)
                self.results.append(_Result(started, time.monotonic() - started, status))
