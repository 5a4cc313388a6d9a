"""Load generation: wrk for throughput and latency, aiohttp for counted and concurrent requests."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

# wrk calls `done` once at the end; its percentiles are in microseconds.
_WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


async def run_wrk(
    url: str, *, duration: float, connections: int, threads: int = 1, timeout: float = 5.0
) -> WrkResult:
    """One wrk run against `url`; bounded by `duration` plus a margin, killed beyond it."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (scripts/ensure-system-deps.sh bench)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA)
    seconds = max(1, round(duration))
    args = [
        binary, f"-t{threads}", f"-c{max(connections, threads)}", f"-d{seconds}s",
        f"--timeout={max(1, round(timeout))}s", "--latency", "-s", script.name, url,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + timeout + 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"wrk did not finish: {' '.join(args)}") from None
    except asyncio.CancelledError:  # Ctrl-C: never leave a wrk behind
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    finally:
        Path(script.name).unlink(missing_ok=True)
    line = next(
        (x for x in out.decode().splitlines() if x.startswith("BENCH_JSON ")),
        None,
    )
    if line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()}{out.decode()}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        requests=raw["requests"],
        errors=errors,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


def session(limit: int = 256, timeout: float = 30.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


@dataclass(frozen=True)
class Timed:
    status: int
    seconds: float
    body: bytes
    headers: dict[str, str]


async def timed_get(http: aiohttp.ClientSession, url: str) -> Timed:
    started = time.perf_counter()
    async with http.get(url) as response:
        body = await response.read()
        seconds = time.perf_counter() - started
        return Timed(response.status, seconds, body, dict(response.headers))


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
