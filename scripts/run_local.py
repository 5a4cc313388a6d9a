"""`make run`: the service on the simulated upstream, with a local Redis when there is one.

Starts, on loopback: a `redis-server` on a free port (unless REDIS_URL is set,
or none is installed, in which case the cache is off and it says so), the
simulated WhatsApp/CRM upstream, and the service on PORT (default 8000).
Prints a ready `curl` line; Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback URL we built
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def main() -> None:
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    port = int(env.get("PORT", "8000"))
    sim_port = free_port()
    tmp = tempfile.mkdtemp(prefix="enriched-contacts-")

    def stop(*_: object) -> None:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    redis_note = f"Redis: {env.get('REDIS_URL')} (from REDIS_URL)"
    if "REDIS_URL" not in env and env.get("USE_REDIS", "true").lower() != "false":
        binary = shutil.which("redis-server")
        if binary:
            redis_port = free_port()
            procs.append(
                subprocess.Popen(
                    [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", tmp],
                    stdout=subprocess.DEVNULL,
                )
            )  # fmt: skip
            wait_port(redis_port)
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            redis_note = f"Redis: a local redis-server on port {redis_port}"
        else:
            env["USE_REDIS"] = "false"
            redis_note = (
                "Redis: no redis-server installed, running with the cache OFF (USE_REDIS=false); "
                "install one (apt-get install redis-server) or set REDIS_URL"
            )

    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "simupstream", "--host", "127.0.0.1", "--port", str(sim_port),
             "--latency-ms", env.get("SIM_LATENCY_MS", "contacts=5,customers=20,users=20")],
            cwd=ROOT,
        )
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{sim_port}/healthz")
    env.setdefault("WHATSAPP_API_URL", f"http://127.0.0.1:{sim_port}")
    env.setdefault("CRM_API_URL", f"http://127.0.0.1:{sim_port}")
    env.setdefault("ADMIN_TOKEN", "dev-admin-token")
    env.setdefault("LOG_FORMAT", "console")
    procs.append(
        subprocess.Popen(
            # The served configuration (app.server), as in the Docker image.
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
        )
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health")
    base = f"http://127.0.0.1:{port}"
    print(
        f"""
  Enriched contacts is running on {base}
  {redis_note}
  Simulated WhatsApp/CRM upstream: http://127.0.0.1:{sim_port} (20 ms CRM latency)

  Try:
    curl -s '{base}/contacts?instance=acme&per_page=3' | python3 -m json.tool
    curl -s -i '{base}/contacts?instance=acme&per_page=3' | grep -i x-enrichment
    curl -s {base}/health
    curl -s -H 'Authorization: Bearer {env["ADMIN_TOKEN"]}' {base}/cache/acme/stats
  API docs: {base}/docs

  Ctrl-C stops everything.
""",
        flush=True,
    )
    while all(proc.poll() is None for proc in procs):
        time.sleep(0.5)
    print("a process exited; stopping", file=sys.stderr)
    stop()


if __name__ == "__main__":
    main()
