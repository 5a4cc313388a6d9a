"""`make run` (scripts/run_local.py) fails fast and clearly, and never leaves a child behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "run_local.py"


def processes_in_group(pgid: int) -> list[str]:
    """Command lines of the live processes of a process group (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            found.append(cmdline)
    return found


def run_local(
    env: dict[str, str], timeout: float, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """The script in a process group of its own, so that whatever it started can be found.

    Its output goes to files, not pipes: a leaked child would hold a pipe open.
    """
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    started = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            env={**os.environ, **env},
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        proc.wait(timeout)
    finally:
        elapsed = time.monotonic() - started
        leftovers = processes_in_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert leftovers == [], "processes left running"
    result = subprocess.CompletedProcess(
        proc.args, proc.returncode, out_path.read_text(), err_path.read_text()
    )
    return result, elapsed


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_busy_port_is_refused_before_anything_starts(busy_port: int, tmp_path: Path) -> None:
    result, elapsed = run_local({"PORT": str(busy_port)}, 60, tmp_path)

    assert result.returncode == 1
    assert elapsed < 15  # it used to wait 20 s for a /health that never came
    assert f"port {busy_port} is already in use" in result.stderr
    assert f"PORT={busy_port + 1} make run" in result.stderr
    assert "Enriched contacts is running" not in result.stdout


def test_a_port_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    result, _ = run_local({"PORT": "eighty"}, 60, tmp_path)

    assert result.returncode == 1
    assert "PORT='eighty' is not a port number" in result.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_service_that_cannot_start_stops_redis_and_the_simulator(tmp_path: Path) -> None:
    """Redis and the simulator are up when the service dies of a bad setting: both stop."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    result, elapsed = run_local(
        {"PORT": str(free), "WHATSAPP_API_URL": "ftp://nowhere"}, 120, tmp_path
    )

    assert result.returncode == 1
    assert "the service exited with status" in result.stderr
    assert "must be an http:// or https:// URL" in result.stderr
    assert elapsed < 60


def test_the_quick_start_works_as_the_banner_says(tmp_path: Path) -> None:
    """The README's first request, then the banner's own redis-cli line, find the customer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_path = tmp_path / "stdout"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            env={**os.environ, "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, "no banner"
            time.sleep(0.2)
        banner = out_path.read_text()
        base = f"http://127.0.0.1:{port}"
        import urllib.request

        with urllib.request.urlopen(f"{base}/contacts?instance=acme&per_page=3") as response:
            assert response.status == 200
        get_line = next(line for line in banner.splitlines() if "GET customer:acme:1" in line)
        deadline = time.monotonic() + 10
        while True:  # stored in the background just after the answer
            cached = subprocess.run(
                get_line.split(), capture_output=True, text=True, check=True
            ).stdout.strip()
            if cached or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cached.startswith("{"), f"{get_line!r} gave {cached!r}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        time.sleep(0.5)
        leftovers = processes_in_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert leftovers == [], "Ctrl-C stops everything"
