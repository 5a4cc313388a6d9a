"""What one request line costs: the structlog path against `HotLogger`, in one run.

Each variant logs the same warm request's line into a pipe that `cat` reads,
as stdout under Docker is; the cost is CPU time per line of this process and
of the reader (a write per line wakes it once per line). Usage:

    .venv/bin/python scripts/bench_log_line.py [--lines 20000] [--rounds 5]

Only the ratios mean something: absolute times move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from app import logging as app_logging
from app.log_handler import BatchingHandler
from bench.procs import cpu_seconds

WARM_LINE = {
    "method": "GET",
    "path": "/contacts",
    "instance": "acme",
    "status": 200,
    "duration_ms": 1.23,
    "cache_hits": 120,
    "cache_misses": 0,
    "crm_calls": 0,
    "contacts": 100,
    "refreshes": 0,
    "enrichment": "complete",
}
# Lines per event-loop iteration: ~5 at 32 connections on a light page (write syscalls
# per request, from /proc/<pid>/io, fell from 1.05 to 0.2 for the log).
PER_ITERATION = 5


def variants(handler: logging.Handler) -> dict[str, Callable[[], None]]:
    slow = structlog.get_logger("app.access")
    fast = app_logging.HotLogger("app.access")
    assert isinstance(handler, BatchingHandler)
    return {
        "structlog, a write per line": lambda: slow.info("request", **WARM_LINE),
        "HotLogger, a write per line": lambda: (
            fast.log(logging.INFO, "request", dict(WARM_LINE)),
            handler.drain(),
        ),
        f"HotLogger, one write per {PER_ITERATION} lines": lambda: fast.log(
            logging.INFO, "request", dict(WARM_LINE)
        ),
    }


async def run(log: Callable[[], None], lines: int) -> None:
    for _ in range(lines // PER_ITERATION):
        for _ in range(PER_ITERATION):
            log()
        await asyncio.sleep(0)  # the end of an event-loop iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    app_logging.configure_logging("info", "json", secrets=["crm-Hs3Jp0Xe6Nb1Qc5U"])
    structlog.contextvars.bind_contextvars(request_id="0123456789abcdef0123456789abcdef")
    read_end, write_end = os.pipe()
    reader = subprocess.Popen(["cat"], stdin=read_end, stdout=subprocess.DEVNULL)
    os.close(read_end)
    handler = next(h for h in logging.root.handlers if h.get_name() == "app.logging")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True))

    costs: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(args.rounds):  # alternated, so load changes hit every variant
            for name, log in variants(handler).items():
                ours, theirs = time.process_time(), cpu_seconds(reader.pid)
                asyncio.run(run(log, args.lines))
                handler.flush()
                time.sleep(0.05)  # the reader catches up
                costs.setdefault(name, []).append(
                    (
                        (time.process_time() - ours) / args.lines * 1e6,
                        (cpu_seconds(reader.pid) - theirs) / args.lines * 1e6,
                    )
                )
    finally:
        handler.setStream(sys.stdout)
        reader.terminate()
    baseline = statistics.median(writer for writer, _ in costs["structlog, a write per line"])
    print(f"{'us per line (median of rounds)':40} {'writer':>8} {'reader':>8} {'old/new':>8}")
    for name, rounds in costs.items():
        writer = statistics.median(w for w, _ in rounds)
        read = statistics.median(r for _, r in rounds)
        print(f"{name:40} {writer:8.2f} {read:8.2f} {baseline / writer:8.1f}")


if __name__ == "__main__":
    main()
