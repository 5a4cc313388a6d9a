"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml, deploy/nginx.conf.

No Docker engine runs where these tests run, so the files are checked for what
they promise: the compose topology against docs/configuration.md's names, the
Dockerfile's stages, user, healthcheck and command, and the nginx
configuration by the real nginx binary, both `nginx -t` and a short live run
that proxies to throwaway loopback backends.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"

NGINX = "/usr/sbin/nginx"

# Copied from docs/configuration.md: the only settings the service reads.
SPEC_SETTINGS = frozenset(
    {
        "WHATSAPP_API_URL",
        "CRM_API_URL",
        "CRM_API_TOKEN",
        "UPSTREAM_TIMEOUT_SECONDS",
        "UPSTREAM_BATCH_SIZE",
        "USE_REDIS",
        "REDIS_URL",
        "REDIS_MODE",
        "REDIS_SENTINELS",
        "REDIS_SENTINEL_MASTER",
        "REDIS_TIMEOUT_SECONDS",
        "CACHE_TTL_SECONDS",
        "CACHE_NEGATIVE_TTL_SECONDS",
        "CACHE_KEY_PREFIX",
        "CACHE_REFRESH_AHEAD_SECONDS",
        "CACHE_STALE_SECONDS",
        "ADMIN_TOKEN",
        "LOG_LEVEL",
        "LOG_FORMAT",
    }
)

# `server ... resolve` in an upstream block is open-source nginx from 1.27.3 on.
RESOLVE_SINCE = (1, 27, 3)


# --------------------------------------------------------------------------- helpers


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    """A service's `environment`, whichever of the two compose syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def _published_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(published, target) of every port a service publishes, short or long syntax."""
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.append((str(entry.get("published", "")), int(entry["target"])))
        else:
            published, _, target = str(entry).rpartition(":")
            ports.append((published, int(target.split("/")[0])))
    return ports


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def _dockerfile_stages(text: str) -> list[Stage]:
    """Split a Dockerfile into its stages (line continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)

    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def _exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments as a list (JSON or shell form)."""
    if args.startswith("["):
        parsed: list[str] = json.loads(args)
        return parsed
    return shlex.split(args)


def _nginx_version() -> tuple[int, ...]:
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=True)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    assert match, f"cannot read the nginx version from {out.stderr!r}"
    return tuple(int(part) for part in match.groups())


def _require_nginx() -> None:
    if Path(NGINX).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{NGINX} is missing: .ci/run must install nginx (apt-get install nginx)")
    pytest.skip(f"{NGINX} is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _local_copy(
    conf: str,
    prefix: Path,
    *,
    servers: list[str] | None = None,
    listen: str | None = None,
) -> Path:
    """deploy/nginx.conf made loadable on this machine, written under `prefix`.

    `nginx -t` resolves upstream host names at load time and `api` and Docker's
    DNS server only exist on the compose network, so they become loopback; the
    `resolve` flag is dropped where the local nginx predates it; temp files and
    the pid go under `prefix` so no root-owned path is needed.
    """
    resolve_ok = _nginx_version() >= RESOLVE_SINCE
    text = conf.replace("resolver 127.0.0.11", "resolver 127.0.0.1")
    server_line = re.compile(r"^([ \t]*)server\s+api:8000\b([^;]*);", re.MULTILINE)
    assert server_line.search(text), "nginx.conf has no `server api:8000` in its upstream"
    if servers is None:

        def one_server(match: re.Match[str]) -> str:
            params = match.group(2)
            host = "localhost" if resolve_ok else "127.0.0.1"
            if not resolve_ok:
                params = re.sub(r"\s+resolve\b", "", params)
            return f"{match.group(1)}server {host}:8000{params};"

        text = server_line.sub(one_server, text)
    else:
        lines = "\n".join(f"{{indent}}server {s};" for s in servers)
        text = server_line.sub(lambda m: lines.replace("{indent}", m.group(1)), text)
    if listen is not None:
        text = re.sub(r"listen\s+80\b[^;]*;", f"listen {listen};", text)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = re.sub(r"^http\s*\{", lambda m: m.group(0) + "\n" + temp, text, count=1, flags=re.M)
    text = f"pid {prefix / 'nginx.pid'};\n" + text
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return parsed


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts: those of an opt-in profile (`monitoring`,
    tests/test_monitoring.py) are not part of the production topology checked here."""
    return {name: svc for name, svc in compose["services"].items() if not svc.get("profiles")}


class TestComposeFile:
    def test_uses_the_compose_spec_without_a_version_key(self, compose: dict[str, Any]) -> None:
        assert "version" not in compose

    def test_has_redis_upstream_api_and_lb(self, services: dict[str, dict[str, Any]]) -> None:
        assert set(services) == {"redis", "upstream", "api", "lb"}

    def test_redis_persists_with_appendonly_on_a_named_volume(
        self, compose: dict[str, Any], services: dict[str, dict[str, Any]]
    ) -> None:
        redis = services["redis"]
        assert redis["image"].startswith("redis:7")
        command = redis["command"]
        words = command if isinstance(command, list) else shlex.split(command)
        assert words[0] == "redis-server"
        assert words[words.index("--appendonly") + 1] == "yes"
        volumes = [
            str(v) if not isinstance(v, dict) else f"{v['source']}:{v['target']}"
            for v in redis["volumes"]
        ]
        data_volume = next(v for v in volumes if v.endswith(":/data"))
        volume_name = data_volume.split(":")[0]
        assert not volume_name.startswith((".", "/")), "redis data must be a named volume"
        assert volume_name in (compose.get("volumes") or {})

    def test_service_and_upstream_share_one_image_built_from_the_dockerfile(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        api, upstream = services["api"], services["upstream"]
        assert api["image"] == upstream["image"] == "enriched-contacts:local"
        assert api.get("build") in (".", {"context": "."})
        assert upstream.get("build") in (".", {"context": "."})

    def test_upstream_runs_the_simulator_on_8081(self, services: dict[str, dict[str, Any]]) -> None:
        command = services["upstream"]["command"]
        words = command if isinstance(command, list) else shlex.split(command)
        assert words[:3] == ["python", "-m", "simupstream"]
        assert words[words.index("--port") + 1] == "8081"
        assert words[words.index("--host") + 1] == "0.0.0.0"

    def test_api_runs_three_replicas_and_publishes_no_port(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        api = services["api"]
        assert api["deploy"]["replicas"] == 3
        assert not api.get("ports"), "replicas are reached only through the load balancer"
        assert "container_name" not in api, "a fixed container name prevents replicas"

    def test_api_sets_only_settings_named_in_the_spec(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        env = _environment(services["api"])
        unknown = set(env) - SPEC_SETTINGS
        assert not unknown, f"not in docs/configuration.md: {sorted(unknown)}"

    def test_api_points_at_the_compose_upstream_and_redis(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        env = _environment(services["api"])
        assert env["WHATSAPP_API_URL"] == "http://upstream:8081"
        assert env["CRM_API_URL"] == "http://upstream:8081"
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["LOG_FORMAT"] == "json"

    def test_admin_token_has_no_well_known_default(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        # Passed through from the operator's environment, or unset (the
        # /cache endpoints then answer 404): never a token everybody knows.
        value = _environment(services["api"]).get("ADMIN_TOKEN")
        assert value is None or re.fullmatch(r"\$\{ADMIN_TOKEN(:?\?[^}]*)?\}", str(value))

    def test_api_waits_for_healthy_redis_and_upstream(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        depends = services["api"]["depends_on"]
        assert {name: spec["condition"] for name, spec in depends.items()} == {
            "redis": "service_healthy",
            "upstream": "service_healthy",
        }

    def test_lb_publishes_one_port_to_nginx_and_mounts_the_conf(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        lb = services["lb"]
        assert lb["image"].startswith("nginx:")
        ports = _published_ports(lb)
        assert len(ports) == 1
        assert ports[0][1] == 80
        assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
        assert lb["depends_on"]["api"]["condition"] == "service_healthy"

    def test_lb_image_supports_resolve_in_upstream_blocks(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        tag = services["lb"]["image"].split(":", 1)[1]
        match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", tag)
        assert match, f"pin the nginx version in the lb image, not {tag!r}"
        major, minor, patch = (int(g) if g else 0 for g in match.groups())
        if match.group(3) is None:  # a minor-only tag floats to the line's last patch
            patch = 99
        assert (major, minor, patch) >= RESOLVE_SINCE

    def test_only_the_load_balancer_publishes_ports(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        assert [name for name, svc in services.items() if svc.get("ports")] == ["lb"]

    @pytest.mark.parametrize("name", ["redis", "upstream", "api", "lb"])
    def test_every_service_has_a_healthcheck(
        self, services: dict[str, dict[str, Any]], name: str
    ) -> None:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check.get("test"), f"{name}'s healthcheck has no test"
        assert not check.get("disable")

    def test_healthchecks_probe_the_documented_endpoints(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        def probe(name: str) -> str:
            test = services[name]["healthcheck"]["test"]
            return " ".join(test) if isinstance(test, list) else str(test)

        assert "redis-cli ping" in probe("redis")
        # The image's role-aware probe (TestHealthcheckScript): /healthz on 8081
        # for the simulator, /health on 8000 for the service.
        assert probe("upstream") == "CMD python /usr/local/bin/healthcheck"
        assert probe("api") == "CMD python /usr/local/bin/healthcheck"
        assert "/nginx-health" in probe("lb")

    def test_lb_is_published_on_loopback_unless_configured(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        (entry,) = services["lb"]["ports"]
        assert entry == "${LB_BIND:-127.0.0.1}:${LB_PORT:-8000}:80"

    def test_docker_compose_config_accepts_the_file(self) -> None:
        # `config` only parses and validates: it needs the CLI, not an engine.
        for cli in (["docker", "compose"], ["docker-compose"]):
            if shutil.which(cli[0]) is None:
                continue
            version = subprocess.run([*cli, "version"], capture_output=True, text=True)
            if version.returncode != 0 or not re.search(r"v?2\.\d+", version.stdout):
                continue
            result = subprocess.run(
                [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            return
        pytest.skip("no Docker Compose v2 CLI here")


# --------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return _dockerfile_stages(DOCKERFILE.read_text())


class TestDockerfile:
    def test_is_multi_stage_on_python_311_slim(self, stages: list[Stage]) -> None:
        assert len(stages) >= 2
        text = DOCKERFILE.read_text()
        assert "python:3.11-slim" in text
        for stage in stages:
            assert stage.base in ("python:3.11-slim", "${PYTHON_IMAGE}")

    def test_builder_installs_exactly_the_lock(self, stages: list[Stage]) -> None:
        builder = stages[0]
        runs = " ".join(builder.all("RUN"))
        assert "--require-hashes -r /tmp/requirements-uv.txt" in runs, "uv itself, by hash"
        assert any(c.split()[:2] == ["pyproject.toml", "uv.lock"] for c in builder.all("COPY"))
        syncs = [run for run in builder.all("RUN") if "uv sync" in run]
        assert len(syncs) == 2, "dependencies in a layer of their own, then the project"
        for sync in syncs:
            assert "--locked" in sync
            assert "--no-dev" in sync
            assert "--no-editable" in sync
        assert "--no-install-project" in syncs[0]
        assert "pip check" in syncs[1]

    def test_uv_is_pinned_once_and_by_hash(self) -> None:
        # `make` and the image install the same uv: the version the Makefile names.
        version = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
        assert version
        pins = (ROOT / "requirements-uv.txt").read_text()
        assert re.search(rf"^uv=={re.escape(version.group(1))} \\$", pins, re.M), "run make lock"
        assert "--hash=sha256:" in pins

    def test_no_syntax_directive_that_would_fetch_a_frontend(self) -> None:
        first = DOCKERFILE.read_text().splitlines()[0]
        assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE)

    def test_final_stage_copies_the_built_virtualenv_and_builds_nothing(
        self, stages: list[Stage]
    ) -> None:
        final = stages[-1]
        assert any(c.startswith("--from=") for c in final.all("COPY"))
        runs = " ".join(final.all("RUN"))
        assert "pip install" not in runs
        assert "apt-get" not in runs

    def test_final_stage_runs_as_a_non_root_user(self, stages: list[Stage]) -> None:
        users = stages[-1].all("USER")
        assert users, "the final stage sets no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0")
        assert user == "10001"

    def test_sets_python_runtime_env_and_exposes_8000(self, stages: list[Stage]) -> None:
        final = stages[-1]
        env = " ".join(final.all("ENV"))
        assert "PYTHONDONTWRITEBYTECODE=1" in env
        assert "PYTHONUNBUFFERED=1" in env
        assert "8000" in final.all("EXPOSE")

    def test_healthcheck_runs_the_role_aware_probe_without_curl(self, stages: list[Stage]) -> None:
        checks = stages[-1].all("HEALTHCHECK")
        assert len(checks) == 1
        command = checks[0].split("CMD", 1)[1].strip()
        assert _exec_form(command) == ["python", "/usr/local/bin/healthcheck"]
        copies = stages[-1].all("COPY")
        assert "--chmod=0755 deploy/healthcheck.py /usr/local/bin/healthcheck" in copies

    def test_cmd_serves_through_python_m_app_behind_the_load_balancer(
        self, stages: list[Stage]
    ) -> None:
        # `python -m app` (app/server.py) is what `make run` starts too; exec
        # form, so the entrypoint's `exec "$@"` makes it PID 1 (SIGTERM reaches it).
        cmd = _exec_form(stages[-1].all("CMD")[-1])
        assert cmd == ["python", "-m", "app", "--host", "0.0.0.0", "--forwarded-allow-ips", "*"]

    def test_entrypoint_script_is_copied_and_execs_the_command(self, stages: list[Stage]) -> None:
        final = stages[-1]
        assert any("deploy/docker-entrypoint.sh" in c for c in final.all("COPY"))
        assert ENTRYPOINT.read_text().rstrip().endswith('exec "$@"')

    def test_copies_only_what_the_package_needs(self, stages: list[Stage]) -> None:
        sources = []
        for stage in stages:
            for copy in stage.all("COPY"):
                words = [w for w in copy.split() if not w.startswith("--")]
                if not any(a.startswith("--from=") for a in copy.split()):
                    sources += words[:-1]
        assert "." not in sources, "COPY . would send the whole context into a layer"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY of {source}, which does not exist"


def _healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestHealthcheckScript:
    """deploy/healthcheck.py: one image, two roles, each probed on its own port and path."""

    @pytest.mark.parametrize(
        ("argv", "env", "url"),
        [
            (["python", "-m", "app", "--host", "0.0.0.0"], {}, "http://127.0.0.1:8000/health"),
            (["python", "-m", "app"], {"PORT": "9000"}, "http://127.0.0.1:9000/health"),
            (["python", "-m", "app", "--port", "9001"], {}, "http://127.0.0.1:9001/health"),
            (
                ["python", "-m", "simupstream", "--host", "0.0.0.0", "--port", "8081"],
                {},
                "http://127.0.0.1:8081/healthz",
            ),
            (["python", "-m", "simupstream", "--port=9090"], {}, "http://127.0.0.1:9090/healthz"),
            (
                ["python", "-m", "simupstream"],
                {"SIM_PORT": "7000"},
                "http://127.0.0.1:7000/healthz",
            ),
        ],
    )
    def test_probes_the_server_that_pid_1_runs(
        self, argv: list[str], env: dict[str, str], url: str
    ) -> None:
        assert _healthcheck_module().probe_url(argv, env) == url

    def test_exits_non_zero_when_nothing_answers(self) -> None:
        # PID 1 here is not ours: whatever it runs, nothing answers on the probed
        # port of a fresh PORT.
        env = {"PATH": os.environ["PATH"], "PORT": str(_free_port()), "SIM_PORT": str(_free_port())}
        result = subprocess.run(
            [sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=env, timeout=20
        )
        assert result.returncode == 1
        assert "127.0.0.1" in result.stderr


class TestEntrypoint:
    def _run(self, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(ENTRYPOINT), "sh", "-c", 'printf %s "${PROMETHEUS_MULTIPROC_DIR:-}"'],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], **env},
            timeout=10,
            check=True,
        )

    def test_one_worker_leaves_prometheus_in_single_process_mode(self) -> None:
        assert self._run({"WEB_CONCURRENCY": "1"}).stdout == ""

    def test_chosen_multiprocess_dir_is_created_and_emptied_of_stale_samples(
        self, tmp_path: Path
    ) -> None:
        directory = tmp_path / "prom"
        directory.mkdir()
        (directory / "counter_123.db").write_bytes(b"stale")
        (directory / "keep.txt").write_text("not ours")
        result = self._run({"WEB_CONCURRENCY": "4", "PROMETHEUS_MULTIPROC_DIR": str(directory)})
        assert result.stdout == str(directory)
        assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]

    def test_missing_multiprocess_dir_is_created(self, tmp_path: Path) -> None:
        directory = tmp_path / "new" / "prom"
        self._run({"PROMETHEUS_MULTIPROC_DIR": str(directory)})
        assert directory.is_dir()


# --------------------------------------------------------------------------- .dockerignore


@pytest.fixture(scope="module")
def patterns() -> set[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return {line.rstrip("/") for line in lines if line and not line.startswith("#")}


class TestDockerignore:
    def test_excludes_the_virtualenv_git_and_secrets(self, patterns: set[str]) -> None:
        assert {".venv", ".git", ".env"} <= patterns

    def test_excludes_caches_and_bench_results(self, patterns: set[str]) -> None:
        assert "**/__pycache__" in patterns
        assert {".pytest_cache", ".mypy_cache", ".ruff_cache"} <= patterns
        assert "bench" in patterns or "bench/results" in patterns

    def test_keeps_what_the_dockerfile_copies(self, patterns: set[str]) -> None:
        for needed in ("app", "simupstream", "pyproject.toml", "README.md"):
            assert needed not in patterns
        assert "!deploy/docker-entrypoint.sh" in patterns or "deploy" not in patterns


# --------------------------------------------------------------------------- nginx


@pytest.fixture(scope="module")
def conf() -> str:
    return NGINX_CONF.read_text()


class TestNginxConf:
    def test_balances_over_every_api_replica_found_by_docker_dns(self, conf: str) -> None:
        assert re.search(r"resolver\s+127\.0\.0\.11\b[^;]*valid=\d+s", conf)
        upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, re.DOTALL)
        assert upstream, "no upstream block"
        name, body = upstream.groups()
        assert re.search(r"^\s*zone\s+\S+\s+\d+k;", body, re.MULTILINE)
        assert re.search(r"^\s*server\s+api:8000\s[^;]*\bresolve\b", body, re.MULTILINE)
        assert re.search(r"^\s*keepalive\s+\d+;", body, re.MULTILINE)
        assert f"proxy_pass http://{name};" in conf

    def test_keeps_connections_to_replicas_alive(self, conf: str) -> None:
        assert "proxy_http_version 1.1;" in conf
        assert 'proxy_set_header Connection "";' in conf

    def test_moves_on_from_a_dead_replica_quickly(self, conf: str) -> None:
        # Under Docker a dead replica's address just stops answering: only the
        # connect timeout ends the attempt, so it must be far below a second.
        retry = re.search(r"proxy_next_upstream\s+([^;]+);", conf)
        assert retry
        assert set(retry.group(1).split()) == {"error", "timeout"}
        # 0: every replica once if need be (several may refuse while they boot).
        assert re.search(r"proxy_next_upstream_tries\s+0;", conf)
        assert re.search(r"proxy_next_upstream_timeout\s+\d+s;", conf)
        connect = re.search(r"proxy_connect_timeout\s+(\d+)(ms|s);", conf)
        assert connect
        assert int(connect.group(1)) / (1000 if connect.group(2) == "ms" else 1) <= 0.5

    def test_bounds_what_a_client_may_hold(self, conf: str) -> None:
        assert re.search(r"^\s*client_header_timeout\s+10s;", conf, re.MULTILINE)
        assert re.search(r"^\s*large_client_header_buffers\s+4\s+8k;", conf, re.MULTILINE)

    def test_forwards_request_id_and_client_address(self, conf: str) -> None:
        assert re.search(r"proxy_set_header\s+X-Request-ID\s+\$\w+;", conf)
        assert "$request_id" in conf
        assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$\w+;", conf)
        assert re.search(r"proxy_set_header\s+X-Forwarded-Proto\s+\$scheme;", conf)

    def test_nginx_accepts_the_configuration(self, tmp_path: Path, conf: str) -> None:
        _require_nginx()
        path = _local_copy(conf, tmp_path)
        result = subprocess.run(
            [NGINX, "-t", "-p", str(tmp_path), "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "test is successful" in result.stderr


# A live run: the shipped configuration, its upstream pointed at loopback
# backends, one of them dead; the live ones answer 502 (the WhatsApp API
# failed) and 503 (overload shed) on some paths, as the service does.


class _QuietServer(ThreadingHTTPServer):
    """nginx resetting its idle keepalive connections at shutdown is not an error."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@dataclass
class Backend:
    name: str
    status: int = 200
    seen: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                backend.seen.append(
                    {
                        "path": self.path,
                        "version": self.request_version,
                        "client_port": self.client_address[1],
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                )
                status = backend.status
                if status == 200 and self.path.startswith("/wa-down"):
                    status = 502  # what the service answers when the WhatsApp API fails
                if status == 200 and self.path.startswith("/shed"):
                    status = 503  # the service shedding overload
                body = json.dumps({"replica": backend.name, "status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class LiveNginx:
    port: int
    healthy: list[Backend]

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        return [r for b in self.healthy for r in b.seen if r["path"] == path]


@pytest.fixture(scope="class")
def live_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNginx]:
    _require_nginx()
    prefix = tmp_path_factory.mktemp("nginx")
    healthy = [Backend("a"), Backend("b")]
    for backend in healthy:
        backend.start()
    dead_port = _free_port()  # nothing listens there: connection refused
    port = _free_port()
    params = "max_fails=1 fail_timeout=5s"
    servers = [f"127.0.0.1:{dead_port} {params}"]
    servers += [f"127.0.0.1:{b.port} {params}" for b in healthy]
    conf = _local_copy(NGINX_CONF.read_text(), prefix, servers=servers, listen=f"127.0.0.1:{port}")
    log = (prefix / "nginx.log").open("w")
    process = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited: {(prefix / 'nginx.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not start listening within 10 s")
                time.sleep(0.05)
        yield LiveNginx(port=port, healthy=healthy)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        for backend in healthy:
            backend.stop()


class TestNginxLive:
    def test_answers_its_own_health_without_a_replica(self, live_nginx: LiveNginx) -> None:
        status, body = live_nginx.get("/nginx-health")
        assert status == 200
        assert json.loads(body) == {"status": "ok"}
        assert live_nginx.requests_to("/nginx-health") == []

    def test_every_request_succeeds_despite_a_dead_replica(self, live_nginx: LiveNginx) -> None:
        answers = [live_nginx.get(f"/contacts?instance=acme&n={i}") for i in range(20)]
        assert {status for status, _ in answers} == {200}
        replicas = {json.loads(body)["replica"] for _, body in answers}
        assert replicas == {"a", "b"}, "the load is spread over the healthy replicas"

    def test_reuses_connections_to_replicas(self, live_nginx: LiveNginx) -> None:
        for i in range(20):
            live_nginx.get(f"/keepalive?n={i}")
        seen = [r for b in live_nginx.healthy for r in b.seen if r["path"].startswith("/keepalive")]
        assert all(r["version"] == "HTTP/1.1" for r in seen)
        assert "connection" not in seen[0]["headers"]
        connections = {
            (id(b), r["client_port"])
            for b in live_nginx.healthy
            for r in b.seen
            if r["path"].startswith("/keepalive")
        }
        assert len(connections) < len(seen)

    def test_a_shed_request_reaches_the_client_and_does_not_mark_the_replica_down(
        self, live_nginx: LiveNginx
    ) -> None:
        for i in range(4):  # whichever replica it lands on
            status, body = live_nginx.get(f"/shed?n={i}")
            assert status == 503
            assert json.loads(body)["status"] == 503, "the replica's body, not nginx's error page"
            assert len(live_nginx.requests_to(f"/shed?n={i}")) == 1, "never replayed"
        answers = [live_nginx.get(f"/after-shed?n={i}") for i in range(10)]
        assert {status for status, _ in answers} == {200}
        assert {json.loads(body)["replica"] for _, body in answers} == {"a", "b"}

    def test_a_replicas_own_502_reaches_the_client_and_is_not_replayed(
        self, live_nginx: LiveNginx
    ) -> None:
        status, body = live_nginx.get("/wa-down")
        assert status == 502
        assert json.loads(body)["status"] == 502, "the replica's body, not nginx's error page"
        assert len(live_nginx.requests_to("/wa-down")) == 1

    def test_passes_the_callers_request_id_through(self, live_nginx: LiveNginx) -> None:
        live_nginx.get("/rid-given", {"X-Request-ID": "req-123"})
        (seen,) = live_nginx.requests_to("/rid-given")
        assert seen["headers"]["x-request-id"] == "req-123"

    def test_mints_a_request_id_when_the_caller_has_none(self, live_nginx: LiveNginx) -> None:
        live_nginx.get("/rid-minted")
        (seen,) = live_nginx.requests_to("/rid-minted")
        assert re.fullmatch(r"[0-9a-f]{32}", seen["headers"]["x-request-id"])

    def test_overwrites_a_forged_forwarded_for(self, live_nginx: LiveNginx) -> None:
        live_nginx.get("/xff", {"X-Forwarded-For": "6.6.6.6"})
        (seen,) = live_nginx.requests_to("/xff")
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert seen["headers"]["x-forwarded-proto"] == "http"
