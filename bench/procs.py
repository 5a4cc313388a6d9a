"""Child processes of the benchmark: started on free loopback ports, always killed on exit.

Every child runs in its own process group, so stopping it also stops what it
spawned (npm, uvicorn's reloaders, shells). `Children.stop_all` runs from a
`finally`, from `atexit` and on SIGTERM/SIGHUP, so an interrupted benchmark
leaves nothing behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of a GET of `url`, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (from /proc), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` (all its threads) so far, 0 when it is gone."""
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def _stat_cpu(path: Path) -> float:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # after "pid (comm)": state is field 3, utime 14 and stime 15 (1-based, man 5 proc)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the main thread of `pid` (the event loop of Node and Python)."""
    return _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


class ChildFailed(RuntimeError):
    """A child exited or did not get ready in time; carries the tail of its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, path: str, timeout: float, interval: float = 0.005) -> float:
        """Poll until GET `path` answers 200; the seconds since the process was started."""
        deadline = time.monotonic() + timeout
        url = self.url + path
        while time.monotonic() < deadline:
            if not self.alive():
                raise ChildFailed(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            if http_status(url, timeout=0.5) == 200:
                return time.perf_counter() - self.started_at
            time.sleep(interval)
        raise ChildFailed(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")


@dataclass
class Children:
    """Every process the benchmark started; `stop_all` ends each one by its own id."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        port: int | None = None,
        unset: tuple[str, ...] = (),
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset},
                cwd=cwd,
                start_new_session=True,  # its own process group: stop() reaches its children
            )
        child = Child(name, proc, log_path, started, port)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        if child.proc.poll() is None:
            _signal_group(child.proc.pid, signal.SIGTERM)
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait(timeout)
        # The group may outlive its leader (a grandchild still running): end it too.
        _signal_group(child.proc.pid, signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(child, timeout=3.0)

    def install_handlers(self) -> None:
        """Stop every child at interpreter exit and on SIGTERM/SIGHUP (SIGINT raises as usual)."""
        atexit.register(self.stop_all)

        def on_signal(signum: int, _: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The group id is the child's own pid (start_new_session); never a broad kill.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
