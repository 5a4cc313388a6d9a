"""What every scenario shares: the options, the targets (`Context`), a report `Section`,
and small helpers (paths, checks, Redis and /metrics counters).

Every comparison is made inside one run, the competitors measured in turn
(A B C, C B A, ...), and reported as the median of the rounds and the median of
the per-round ratios, because the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.profiles import PROFILES, SIM_USERS
from bench.runtime import RuntimeUnavailable, runtime_python
from bench.stack import Stack, Target
from simupstream import data

#: Agents per tenant in the warm, cold and counts scenarios: with the sim's default of 50,
#: every page of 100 references the nonexistent user 51, which the Node.js design
#: (no negative caching) fetches from the CRM on every request.
WARM_USERS = SIM_USERS
DEFAULT_USERS = data.DEFAULT_USERS
DEFAULT_CUSTOMERS = data.DEFAULT_CUSTOMERS
#: MAX_ACTIVE_REQUESTS of the service without admission control (overload scenario)
UNLIMITED = 1_000_000
#: Redis commands the benchmark itself sends (excluded from the counts).
ADMIN_COMMANDS = {
    "info",
    "config|resetstat",
    "config",
    "ping",
    "flushdb",
    "dbsize",
    "scan",
    "hello",
}


#: the target of the image install, with `--image-python`
IMAGE = "image"


@dataclass(frozen=True)
class Variant:
    """Another build of the service for A/B runs: `app` from `folder`, with extra environment.

    `image`: the service runs from the image install instead (`Context.installed`: this
    checkout and its runtime dependencies only, installed with `Options.image_python`)."""

    name: str
    folder: str
    env: tuple[tuple[str, str], ...] = ()
    image: bool = False


@dataclass(frozen=True)
class Options:
    #: Many short runs rather than a few long ones: a per-round ratio compares two runs made
    #: back to back, and the more of them, the less one busy spell of the machine moves
    #: their median.
    duration: float = 3.0
    rounds: int = 6
    warmup: float = 2.0
    #: wrk connections of the warm scenario; None: each profile's own (32, at the service's
    #: default admission limit, so the measure is of serving, not of queueing; 8 for big)
    connections: int | None = None
    threads: int = 1
    #: the page profiles of the warm scenario (bench/profiles.py)
    profiles: tuple[str, ...] = tuple(PROFILES)
    #: the profile whose page the cold scenario asks for, under a new instance each time
    cold_profile: str = "big"
    page_size: int = 100
    cold_samples: int = 15
    count_requests: int = 20
    startup_runs: int = 5
    stampede: int = 200
    stampede_pages: int = 4
    memory_customers: int = 100_000
    #: wrk connections of the overload scenario: eight times the warm scenario's (light)
    overload_connections: int = 256
    contacts_ms: float = 5.0
    crm_ms: float = 20.0
    skip_node: bool = False
    #: extra services in the warm, cold, stampede and overload scenarios (A/B runs)
    variants: tuple[Variant, ...] = ()
    #: which targets the warm scenario measures (None: all); "service" is always kept
    warm_targets: tuple[str, ...] | None = None
    #: the interpreter of the image install (start-up, and the "image" target when given);
    #: None: the benchmark's own
    image_python: str | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        values: dict[str, Any] = {
            "duration": 1.0,
            "rounds": 1,
            "warmup": 0.0,
            "connections": 16,
            "cold_samples": 3,
            "count_requests": 5,
            "startup_runs": 2,
            "stampede": 40,
            "memory_customers": 5_000,
            "overload_connections": 48,  # above the default limit of 32: some requests queue
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class Section:
    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    stack: Stack
    options: Options
    log: Callable[[str], None]
    #: this run's own files (the image install); a new temporary folder by default
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))
    _targets: dict[str, Target] = field(default_factory=dict)
    _installed: tuple[str, str] | RuntimeUnavailable | None = None

    def installed(self) -> tuple[str, str]:
        """The image install (bench.runtime), built once per run with `--image-python`
        (default: the benchmark's own interpreter), in this run's folder: its interpreter,
        and what it was built with ("Python 3.11.2, /usr/bin/python3.11"). A failure is
        raised again to every later caller, not retried."""
        if self._installed is None:
            python = self.options.image_python or sys.executable
            self.log(f"  installing the service as the image does, with {python}")
            target = self.workdir / "image-install"
            shutil.rmtree(target, ignore_errors=True)  # an earlier run's, in the same folder
            try:
                installed = runtime_python(python, target)
                self._installed = (installed, f"Python {python_version(installed)}, {python}")
            except RuntimeUnavailable as exc:
                self._installed = exc
            except (OSError, subprocess.SubprocessError) as exc:  # (uv hung, a copy failed)
                self._installed = RuntimeUnavailable(f"{type(exc).__name__}: {exc}")
        if isinstance(self._installed, RuntimeUnavailable):
            raise self._installed
        return self._installed

    # The long-lived targets, started on first use; each service/node with its own Redis db.
    def target(self, name: str) -> Target:
        if name not in self._targets:
            self.log(f"  starting {name}")
            stack = self.stack
            variants = {v.name: v for v in self.options.variants}
            if name in variants:
                variant = variants[name]
                installed = None
                label = f"service [{name}]"
                if variant.image:
                    installed, built_with = self.installed()
                    label = f"service, image install [{name}: {built_with}]"
                self._targets[name] = stack.start_service(
                    name,
                    db=0,
                    source=Path(variant.folder).resolve(),
                    label=label,
                    env=dict(variant.env),
                    installed=installed,
                )
                return self._targets[name]
            starters: dict[str, Callable[[], Target]] = {
                "service": lambda: stack.start_service("service", db=0),
                "node": lambda: stack.start_node("node", db=1),
                "service-noredis": lambda: stack.start_service("service-noredis", db=None),
                "service-unlimited": lambda: stack.start_service(
                    "service-unlimited",
                    db=0,
                    label="service, no admission limit",
                    env={"MAX_ACTIVE_REQUESTS": str(UNLIMITED)},
                ),
                "passthrough": lambda: stack.start_passthrough("passthrough"),
            }
            self._targets[name] = starters[name]()
        return self._targets[name]

    def names(self, *wanted: str) -> list[str]:
        return [n for n in wanted if not (self.options.skip_node and n == "node")]


# -- helpers ---------------------------------------------------------------------------------


def python_version(python: str) -> str:
    """The version of the interpreter at `python`, e.g. 3.11.2."""
    done = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def contacts_path(instance: str, per_page: int, page: int = 1) -> str:
    return f"/contacts?instance={instance}&per_page={per_page}&page={page}"


def clean_page(instance: str, per_page: int, customers: int, users: int) -> int:
    """The first page whose every referenced customer and user exists (simupstream's rules)."""
    for page in range(1, 5000):
        if all(
            _exists(data.contact(instance, i, customers, users), customers, users)
            for i in range((page - 1) * per_page, page * per_page)
        ):
            return page
    raise RuntimeError("no page without unknown ids: change WARM_USERS")


def _exists(contact: dict[str, Any], customers: int, users: int) -> bool:
    cid, uid = contact["customerId"], contact["userId"]
    if cid is not None:
        k = data.parse_customer_id(str(cid))
        if k is None or data.customer("x", k, customers) is None:
            return False
    if uid is not None:
        k = data.parse_user_id(str(uid))
        if k is None or data.user("x", k, users) is None:
            return False
    return True


def enriched_ok(body: bytes, expected: int) -> bool:
    """`expected` contacts, each with `customer` and `user` keys, some of them objects."""
    try:
        items = orjson.loads(body)["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return (
        len(items) == expected
        and all("customer" in c and "user" in c for c in items)
        and any(isinstance(c["customer"], dict) for c in items)
    )


def redis_snapshot(stack: Stack) -> dict[str, int]:
    """Commands by name and socket reads since the last RESETSTAT (one INFO call)."""
    info = stack.admin.info("everything")
    counts = {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in info.items()
        if key.startswith("cmdstat_") and isinstance(value, dict)
    }
    counts["_reads"] = int(info.get("total_reads_processed", 0))
    return counts


def redis_reset(stack: Stack) -> None:
    stack.admin.config_resetstat()


def service_counters(target: Target, *names: str) -> dict[str, float]:
    """Counters of the service's `/metrics`, each summed over its labels."""
    totals = dict.fromkeys(names, 0.0)
    with urllib.request.urlopen(target.url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def service_round_trips(target: Target) -> float | None:
    """The service's own `redis_round_trips_total` (all ops), None for other targets."""
    if not target.name.startswith("service"):
        return None
    return service_counters(target, "redis_round_trips_total")["redis_round_trips_total"]


async def settle(seconds: float = 0.3) -> None:
    """Let background CRM fetches and pipelined writes of the last requests finish."""
    await asyncio.sleep(seconds)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def ms(seconds: float) -> float:
    return seconds * 1000
