"""What the benchmark runs: Redis, the simulated upstream, nginx serving the page profiles,
the service, the Node.js reference and the bare pass-through, each a child process on a
free loopback port.

Every target reads its contacts pages from nginx (bench/nginx.py: a profile's
page from a file, anything else from the simulator) and the CRM from the
simulator."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.nginx import start_nginx
from bench.procs import LOOPBACK, Child, Children, free_port
from bench.profiles import Profile

REPO = Path(__file__).resolve().parent.parent
#: The Node.js original, kept in the repository with its dependencies locked.
NODE_SOURCE = REPO / "bench" / "seed-node"
READY_TIMEOUT = 30.0

#: Every setting of the service, pinned, so a developer's `.env` cannot skew a run: the
#: defaults of production (one JSON request line at `info`), and a CRM token of its own
#: (the recommended mode), so the cache keys are `customer:<instance>:<id>`, the keys the
#: Node.js design uses too.
SERVICE_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",  # as in the Docker image (the log writer's path depends on it)
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
    "UPSTREAM_TIMEOUT_SECONDS": "10",
    "UPSTREAM_BATCH_SIZE": "100",
    "CACHE_TTL_SECONDS": "300",
    "CACHE_NEGATIVE_TTL_SECONDS": "60",
    "CACHE_KEY_PREFIX": "",
    "CACHE_REFRESH_AHEAD_SECONDS": "0",
    "CACHE_STALE_SECONDS": "0",
    "REDIS_MODE": "standalone",
    "REDIS_TIMEOUT_SECONDS": "0.25",
    "ADMIN_TOKEN": "",
    "CRM_API_TOKEN": "bench-crm-token",
}
#: TTL of the objects a warm scenario writes to Redis: longer than any run.
PREFILL_TTL_SECONDS = 3600
#: Inherited variables a child must not see: one process keeps its metrics in memory; and
#: a Python that may not write bytecode compiles every module from source at each start
#: (seconds of start-up; the Docker image ships compiled bytecode).
UNSET_ENV = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "PYTHONDONTWRITEBYTECODE")


@dataclass
class Target:
    """One HTTP server under test."""

    name: str
    label: str
    child: Child
    redis_db: int | None = None

    @property
    def url(self) -> str:
        return self.child.url


@dataclass
class Sim:
    """The simulated upstream and its control API."""

    child: Child

    @property
    def url(self) -> str:
        return self.child.url

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def configure(self, **patch: Any) -> None:
        self._call("PUT", "/_sim/config", patch)

    def reset(self) -> None:
        self._call("POST", "/_sim/reset")

    def stats(self, *, per_id: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_sim/stats" + ("?per_id=1" if per_id else ""))
        return result

    def ids_fetched(self, instance: str) -> int:
        """CRM ids (customers and users) fetched for `instance` since the last reset."""
        prefix = f"{instance}:"
        per_id = self.stats(per_id=True)["fetches_per_id"]
        return sum(
            n for counts in per_id.values() for key, n in counts.items() if key.startswith(prefix)
        )


@dataclass
class Stack:
    children: Children
    redis_child: Child
    sim: Sim
    #: nginx: the profiles' pages from files, every other contacts page from the sim
    contacts: Child
    node_dir: Path | None
    targets: dict[str, Target] = field(default_factory=dict)
    _admin: redis.Redis | None = None

    @property
    def redis_port(self) -> int:
        assert self.redis_child.port is not None
        return self.redis_child.port

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}"

    def redis_db(self, db: int = 0) -> redis.Redis:
        """A new client of database `db` (close it when done)."""
        return redis.Redis(host=LOOPBACK, port=self.redis_port, db=db, socket_timeout=10)

    @property
    def contacts_url(self) -> str:
        return self.contacts.url

    def prefill(self, profile: Profile, instance: str, dbs: tuple[int, ...]) -> int:
        """Write every object `profile`'s page references to Redis, in each of `dbs`, as
        both designs cache it: the same bytes for every target. The number of keys."""
        entries = list(profile.cache_entries(instance))
        for db in dbs:
            client = self.redis_db(db)
            try:
                pipe = client.pipeline(transaction=False)
                for key, value in entries:
                    pipe.set(key, value, ex=PREFILL_TTL_SECONDS)
                pipe.execute()
            finally:
                client.close()
        return len(entries)

    @property
    def admin(self) -> redis.Redis:
        """One long-lived connection for the counters, so counting adds no connect/HELLO."""
        if self._admin is None:
            self._admin = redis.Redis(
                host=LOOPBACK,
                port=self.redis_port,
                socket_timeout=10,
                single_connection_client=True,
            )
        return self._admin

    def start_service(
        self,
        name: str,
        *,
        db: int | None,
        wait: bool = True,
        source: Path = REPO,
        label: str | None = None,
        env: dict[str, str] | None = None,
        installed: str | None = None,
    ) -> Target:
        """`python -m app`, the served configuration (the Docker image's command: uvicorn
        with uvloop, httptools and the server's bounds); `db=None` is `USE_REDIS=false`.

        `source` is a folder holding an `app` package (a copy or a git worktree of the
        repository, for A/B runs); it comes first on the child's import path.
        `installed` is instead an interpreter whose environment has the service installed
        (bench.runtime: as in the image), run from that environment's own folder.
        """
        port = free_port()
        env = {
            **SERVICE_ENV,
            **(env or {}),
            "WHATSAPP_API_URL": self.contacts_url,
            "CRM_API_URL": self.sim.url,
            "USE_REDIS": "false" if db is None else "true",
            "REDIS_URL": f"{self.redis_url}/{db or 0}",
        }
        unset = UNSET_ENV
        if installed is None:
            python, cwd = sys.executable, source
            env["PYTHONPATH"] = str(source)
        else:
            python, cwd = installed, Path(installed).parent.parent
            unset = (*unset, "PYTHONPATH", "VIRTUAL_ENV")
        args = [
            python, "-m", "app", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        child = self.children.spawn(name, args, env=env, cwd=cwd, port=port, unset=unset)
        if wait:
            child.wait_http("/health", READY_TIMEOUT)
        if label is None:
            label = "service" if db is not None else "service USE_REDIS=false"
        return Target(name, label, child, db)

    def start_node(self, name: str, *, db: int | None, wait: bool = True) -> Target:
        if self.node_dir is None:
            raise RuntimeError("the Node.js reference is not installed (--skip-node)")
        port = free_port()
        env = {
            "PORT": str(port),
            "WHATSAPP_API_URL": self.contacts_url,
            "CRM_API_URL": self.sim.url,
            "REDIS_URL": f"{self.redis_url}/{db or 0}",
            "USE_REDIS": "false" if db is None else "true",
            "NODE_ENV": "production",
        }
        node = shutil.which("node") or "node"
        child = self.children.spawn(
            name, [node, "server.js"], env=env, cwd=self.node_dir, port=port
        )
        if wait:
            child.wait_http("/health", READY_TIMEOUT)
        return Target(name, "Node.js reference", child, db)

    def start_passthrough(self, name: str) -> Target:
        port = free_port()
        args = [
            sys.executable, "-m", "bench.passthrough",
            "--port", str(port), "--upstream", self.contacts_url,
        ]  # fmt: skip
        child = self.children.spawn(name, args, cwd=REPO, port=port)
        child.wait_http("/health", READY_TIMEOUT)
        return Target(name, "bare pass-through", child)


def start_stack(children: Children, *, node_dir: Path | None) -> Stack:
    """Redis, the simulated upstream and nginx in front of it; the targets are started by
    the scenarios (`Context.target`)."""
    redis_port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/ensure-system-deps.sh bench)")
    redis_child = children.spawn(
        "redis",
        [
            binary, "--port", str(redis_port), "--bind", LOOPBACK, "--save", "",
            "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "no",
            "--databases", "16",
        ],
        port=redis_port,
    )  # fmt: skip
    client = redis.Redis(host=LOOPBACK, port=redis_port, socket_timeout=2)
    for _ in range(500):
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            pass
        if not redis_child.alive():
            break
        time.sleep(0.02)
    else:
        raise RuntimeError("redis-server did not start")
    client.close()

    sim_port = free_port()
    sim_child = children.spawn(
        "sim",
        [
            sys.executable, "-m", "simupstream", "--host", LOOPBACK, "--port", str(sim_port),
            "--latency-ms", "contacts=0,customers=0,users=0",
        ],
        cwd=REPO,
        port=sim_port,
    )  # fmt: skip
    sim_child.wait_http("/healthz", READY_TIMEOUT)
    assert sim_child.port is not None
    nginx = start_nginx(children, Path(tempfile.mkdtemp(prefix="bench-nginx-")), sim_child.port)
    return Stack(children, redis_child, Sim(sim_child), nginx, node_dir)


class NodeUnavailable(RuntimeError):
    """The Node.js reference cannot run here; the benchmark measures the rest."""


def node_missing() -> str | None:
    """Why the Node.js reference cannot be installed here, or None when node and npm exist."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (scripts/ensure-system-deps.sh bench)"
    return None


def prepare_node(source: Path, cache_root: Path | None = None) -> Path:
    """Copy the Node.js reference to a writable folder and install it there (once).

    With a `package-lock.json` beside it, `npm ci` installs exactly the locked versions.
    """
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    if not files:
        raise NodeUnavailable(f"no Node.js reference in {source}")
    reason = node_missing()
    if reason is not None:
        raise NodeUnavailable(reason)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = root / "enriched-contacts-bench" / f"seed-node-{digest.hexdigest()[:12]}"
    if (target / "node_modules" / ".bench-installed").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    locked = (target / "package-lock.json").exists()
    npm = shutil.which("npm") or "npm"
    try:
        result = subprocess.run(
            [npm, "ci" if locked else "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NodeUnavailable(
            "npm did not finish within 300 s (is the registry reachable?)"
        ) from None
    if result.returncode != 0:
        raise NodeUnavailable(f"npm {'ci' if locked else 'install'} failed:\n{result.stderr}")
    (target / "node_modules" / ".bench-installed").touch()
    return target
