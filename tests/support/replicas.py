"""Real processes for multi-process tests: the service under uvicorn, the simulator, nginx.

Each runs as a subprocess on a free loopback port with its output in files,
so a test can read what the process logged, kill it, and look at it through
HTTP exactly as an operator or a load balancer would.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import RedisServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: nothing of the developer's shell (REDIS_URL, .env) leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra or {})
    return env


def service_env(sim_url: str, redis: RedisServer, **extra: str) -> dict[str, str]:
    """The service's settings against the simulator at `sim_url` and `redis`, at info."""
    return {
        "WHATSAPP_API_URL": sim_url,
        "CRM_API_URL": sim_url,
        "REDIS_URL": redis.url,
        "LOG_LEVEL": "info",
        **extra,
    }


class _Subprocess:
    """A subprocess with stdout and stderr in files of its own directory."""

    name = "process"

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.workdir / f"{self.name}.stdout"
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    def _spawn(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        stdout = self.stdout_path.open("ab")
        stderr = self.stderr_path.open("ab")
        self._files = [stdout, stderr]
        self.proc = subprocess.Popen(
            list(args), cwd=self.workdir, env=dict(env), stdout=stdout, stderr=stderr
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL if it takes longer than `timeout`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_files()
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, like a crash or the OOM killer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_files()

    def _close_files(self) -> None:
        for file in self._files:
            file.close()
        self._files = []

    def _failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} {what}\n--- stdout\n{self.output()[-3000:]}\n"
            f"--- stderr\n{self.errors()[-3000:]}"
        )


class ServiceProcess(_Subprocess):
    """`python -m app` (the served configuration, app.server) on a loopback port, configured
    by `env` only.

    It runs in its own directory (so no `.env` file is read) with a clean
    environment plus `env`; stdout, where the service logs, goes to a file.
    """

    name = "service"

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        workers: int = 1,
        args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.env = clean_env(env)
        self.workers = workers
        self.args = list(args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> ServiceProcess:
        """Start the process without waiting (to start several at once); see `wait_ready`."""
        command = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        self._spawn([*command, *self.args], self.env)
        return self

    def wait_ready(self, timeout: float = 30.0) -> ServiceProcess:
        """Until `GET /health` answers 200 (with several workers: until each logged its start)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while True:
                if not self.running:
                    raise self._failure("exited before it was ready")
                try:
                    if client.get(f"{self.url}/health").status_code == 200 and (
                        self.workers == 1 or len(self.worker_pids()) >= self.workers
                    ):
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise self._failure(f"not ready after {timeout}s")
                time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        return self.spawn().wait_ready(timeout)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stdout line as JSON (a line that is not JSON fails the test here)."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == event]

    def worker_pids(self) -> set[int]:
        """The pids that logged `service.start` (each uvicorn worker does, once)."""
        pids: set[int] = set()
        for line in self.output().splitlines():
            if '"service.start"' in line:
                pids.add(int(json.loads(line)["pid"]))
        return pids


class SimProcess(_Subprocess):
    """The simulated WhatsApp/CRM upstream (`python -m simupstream`), read through its HTTP API."""

    name = "simupstream"

    def __init__(
        self, *, port: int | None = None, args: Sequence[str] = (), workdir: Path | None = None
    ) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.args = list(args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> SimProcess:
        command = [sys.executable, "-m", "simupstream", "--host", "127.0.0.1"]
        self._spawn([*command, "--port", str(self.port), *self.args], clean_env())
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise self._failure("exited before it was ready")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise self._failure(f"not ready after {timeout}s")
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_sim/stats", timeout=5)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sim/reset", timeout=5).raise_for_status()


class NginxProcess(_Subprocess):
    """A real nginx, as the current user, load-balancing over services on loopback ports.

    Everything nginx writes (pid, logs, temp files) stays in its own directory.
    The proxy settings are those of deploy/nginx.conf that matter here: retry
    on `error timeout http_503`, and skip a replica after `max_fails`.
    """

    name = "nginx"

    def __init__(
        self,
        upstream_ports: Sequence[int],
        *,
        port: int | None = None,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.upstream_ports = list(upstream_ports)
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def config(self) -> str:
        directory = self.workdir
        servers = "\n".join(
            f"        server 127.0.0.1:{port} max_fails={self.max_fails}"
            f" fail_timeout={self.fail_timeout:g}s;"
            for port in self.upstream_ports
        )
        # As root, nginx would hand its workers to `nobody`, who cannot write here.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        return f"""
{user}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    log_format upstream '$status|$upstream_addr|$upstream_status';
    access_log {self.access_log} upstream;

    upstream service {{
{servers}
        keepalive 32;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""

    def start(self, timeout: float = 10.0) -> NginxProcess:
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        command = [binary, "-p", str(self.workdir), "-e", str(self.error_log), "-c", str(conf)]
        self._spawn([*command, "-g", "daemon off;"], clean_env())
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            raise self._failure(f"not listening after {timeout}s: {self.errors_logged()}") from None
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        return super().stop(timeout)

    def errors_logged(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def upstreams_used(self) -> list[str]:
        """`$upstream_addr` of each request served (several, comma-separated, when retried)."""
        if not self.access_log.exists():
            return []
        return [line.split("|")[1] for line in self.access_log.read_text().splitlines()]


def scrape(url: str, timeout: float = 5.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`GET {url}/metrics` as {(sample name, labels): value}."""
    response = httpx.get(f"{url}/metrics", timeout=timeout)
    response.raise_for_status()
    return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The value of one sample (0 when it does not exist yet, as for a counter never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
