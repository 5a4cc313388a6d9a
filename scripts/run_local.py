"""`make run`: the service on the simulated upstream, with a local Redis when there is one.

Starts, on loopback: a `redis-server` on a free port (unless REDIS_URL is set,
or none is installed, in which case the cache is off and it says so), the
simulated WhatsApp/CRM upstream, and the service on PORT (default 8000).
Prints ready `curl` and `redis-cli` lines; Ctrl-C stops everything.

Whatever goes wrong (the port is taken, a child exits or never answers), every
child started so far is stopped before this script exits non-zero.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_SIM_LATENCY = "contacts=5,customers=20,users=20"
ADMIN_TOKEN = "dev-admin-token"


class StartError(Exception):
    """Something did not start; the message says what and what to do."""


class Children:
    """The processes this script started, stopped together whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        quiet: bool = False,
    ) -> None:
        stdout = subprocess.DEVNULL if quiet else None
        self.procs.append((name, subprocess.Popen(args, cwd=ROOT, env=env, stdout=stdout)))

    def exited(self) -> tuple[str, int] | None:
        """The first child that is no longer running, with its exit status."""
        for name, proc in self.procs:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self) -> None:
        # A second Ctrl-C must not interrupt the stopping itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def service_port(env: dict[str, str]) -> int:
    """PORT, checked free before anything starts (uvicorn would only fail after start-up)."""
    raw = env.get("PORT", "8000")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StartError(f"PORT={raw!r} is not a port number (1-65535)")
    port = int(raw)
    with socket.socket() as sock:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartError(
                    f"port {port} is already in use on {HOST} (another `make run`?). "
                    f"Stop what holds it, or pick another port: PORT={port + 1} make run"
                ) from None
            raise StartError(f"cannot listen on {HOST}:{port} (PORT): {exc}") from None
    return port


def wait_until(ready: Callable[[], bool], what: str, children: Children, timeout: float) -> None:
    """Poll `ready()` until it is true; fail at once if a child exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = children.exited()
        if gone is not None:
            name, code = gone
            raise StartError(f"the {name} exited with status {code} (see its output above)")
        if ready():
            return
        time.sleep(0.1)
    raise StartError(f"{what} did not answer within {timeout:.0f} s")


def answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback URL we built
            return True
    except OSError:
        return False


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def start_redis(children: Children, env: dict[str, str], tmp: str) -> tuple[str, str | None]:
    """(what the banner says about Redis, a redis-cli command line or None)."""
    if "REDIS_URL" in env:
        url = env["REDIS_URL"]
        cli = f"redis-cli -u {url}" if url.startswith(("redis://", "rediss://")) else None
        return f"Redis: {url} (from REDIS_URL)", cli
    if env.get("USE_REDIS", "true").lower() == "false":
        return "Redis: off (USE_REDIS=false)", None
    binary = shutil.which("redis-server")
    if binary is None:
        env["USE_REDIS"] = "false"
        return (
            "Redis: no redis-server installed, running with the cache OFF (USE_REDIS=false);"
            " install one (apt-get install redis-server) or set REDIS_URL",
            None,
        )
    port = free_port()
    children.start(
        "redis-server",
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", tmp],
        quiet=True,
    )  # fmt: skip
    wait_until(lambda: accepts(port), "redis-server", children, 10)
    env["REDIS_URL"] = f"redis://{HOST}:{port}/0"
    return f"Redis: a local redis-server on port {port}", f"redis-cli -p {port}"


def banner(
    base: str, redis_note: str, redis_cli: str | None, sim_url: str, latency: str, token: str,
    prefix: str,
) -> str:  # fmt: skip
    lines = [
        "",
        f"  Enriched contacts is running on {base}",
        f"  {redis_note}",
        f"  Simulated WhatsApp/CRM upstream: {sim_url} (latency ms: {latency or '0'})",
        f"  Admin token: {token}",
        "",
        "  Try:",
        f"    curl -s '{base}/contacts?instance=acme&per_page=3' | python3 -m json.tool",
        f"    curl -s -i '{base}/contacts?instance=acme&per_page=3' | grep -i x-enrichment",
        f"    curl -s {base}/health",
        f"    curl -s -H 'Authorization: Bearer {token}' {base}/cache/acme/stats",
    ]
    if redis_cli:
        lines += [
            "  and, after the first request, the cache itself:",
            f"    {redis_cli} --scan --pattern '{prefix}customer:acme:*'",
            f"    {redis_cli} GET {prefix}customer:acme:1",
        ]
    lines += [f"  API docs: {base}/docs", "", "  Ctrl-C stops everything.", ""]
    return "\n".join(lines)


def run(children: Children, env: dict[str, str], tmp: str) -> None:
    port = service_port(env)
    redis_note, redis_cli = start_redis(children, env, tmp)

    sim_port = free_port()
    latency = env.get("SIM_LATENCY_MS", DEFAULT_SIM_LATENCY)
    children.start(
        "simulated upstream",
        [sys.executable, "-m", "simupstream", "--host", HOST, "--port", str(sim_port),
         "--latency-ms", latency],
    )  # fmt: skip
    sim_url = f"http://{HOST}:{sim_port}"
    wait_until(lambda: answers_http(f"{sim_url}/healthz"), "the simulator", children, 20)

    env.setdefault("WHATSAPP_API_URL", sim_url)
    env.setdefault("CRM_API_URL", sim_url)
    env.setdefault("ADMIN_TOKEN", ADMIN_TOKEN)
    # The recommended mode (one cached object per id, under the documented keys the
    # banner's redis-cli lines read); the simulator accepts any token unless SIM_TOKEN is set.
    env.setdefault("CRM_API_TOKEN", env.get("SIM_TOKEN") or "dev-crm-token")
    env.setdefault("LOG_FORMAT", "console")
    children.start(
        "service",
        # The served configuration (app.server: bounded request heads, idle connections
        # closed), as in the Docker image.
        [sys.executable, "-m", "app", "--host", HOST, "--port", str(port)],
        env=env,
    )  # fmt: skip
    base = f"http://{HOST}:{port}"
    wait_until(lambda: answers_http(f"{base}/health"), "the service", children, 30)
    token, prefix = env["ADMIN_TOKEN"], env.get("CACHE_KEY_PREFIX", "")
    print(banner(base, redis_note, redis_cli, sim_url, latency, token, prefix), flush=True)

    while children.exited() is None:
        time.sleep(0.5)
    name, code = children.exited() or ("", 0)
    raise StartError(f"the {name} exited with status {code}; stopping the rest")


def main() -> int:
    children = Children()
    tmp = tempfile.mkdtemp(prefix="enriched-contacts-")

    def interrupted(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        run(children, dict(os.environ), tmp)
    except StartError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        children.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
