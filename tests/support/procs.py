"""Real server processes for the tests: redis-server on free loopback ports, and helpers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same twice in this test run.

    The kernel may offer a port again as soon as it is released, so two servers
    started one after the other could otherwise be given the same port.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def redis_server_binary() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """One real `redis-server` on a loopback port, that a test can kill, pause and restart."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.fixed_port = port is not None
        self.started_before = False
        self.port = port or free_port()
        self.extra = list(extra)
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._admin: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it; the first time, on a port another process took meanwhile, try a new one.

        A restart keeps its port: the service under test is configured with it.
        """
        for _ in range(5):
            if self._start_once():
                self.started_before = True
                return self
            if self.fixed_port or self.started_before:
                break
            self.port = free_port()
        raise TimeoutError(f"redis-server on {self.port} did not start")

    def _start_once(self) -> bool:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # could not bind the port
            try:
                # the server on the port must be this one, not a neighbour's
                if self.client().info("server")["process_id"] == self.proc.pid:
                    return True
            except redis.ConnectionError:
                pass
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait(5)
        return False

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **kwargs)

    @property
    def admin(self) -> redis.Redis:
        """One long-lived connection for the test's own look-ups (no HELLO in the counts)."""
        if self._admin is None:
            self._admin = self.client(single_connection_client=True)
        return self._admin

    def kill(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing ever answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command_counts(self) -> dict[str, int]:
        """`INFO commandstats` as {command: calls} (e.g. {"mget": 1, "set": 40})."""
        stats = self.admin.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def reset_stats(self) -> None:
        self.admin.config_resetstat()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Poll `check` until it holds; fail after `timeout` (a bound, not a sleep to tune)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} did not hold within {timeout}s")
        await asyncio.sleep(interval)


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status, in bytes: `VmRSS` (resident
    now) or `VmHWM` (the high-water mark of resident memory)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")
