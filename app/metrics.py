"""Prometheus metrics (names fixed: docs/operations.md "Metrics") and the `/metrics` rendering.

With `PROMETHEUS_MULTIPROC_DIR` set (several uvicorn workers), every process
writes its samples to files there and `/metrics` aggregates them, so any
worker that answers the scrape reports the whole server: counters and
histograms summed over every worker that ever ran, gauges over the live ones.

prometheus-client chooses between in-memory and file-backed values once, when
it is first imported, from that environment variable: it must be set before
the process starts (the Docker entrypoint does it, and empties the directory
of a previous run's files), never later. `MULTIPROCESS` tells which one this
process got, and everything here follows it rather than the variable.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import re
from typing import Final, TypeVar

# An empty value would still switch prometheus-client to files, written to the
# working directory: empty means unset, as for every other variable.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR", "-").strip() == "":
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

from prometheus_client import (  # after the clean-up above
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

MetricT = TypeVar("MetricT", bound=MetricWrapperBase)

MULTIPROCESS: Final[bool] = bool(getattr(values.ValueClass, "_multiprocess", False))
_DIRECTORY: Final = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "") if MULTIPROCESS else ""
_LIVE_GAUGE_FILE: Final = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")

if MULTIPROCESS and not _DIRECTORY:
    raise RuntimeError("PROMETHEUS_MULTIPROC_DIR was emptied after prometheus_client was imported")
if MULTIPROCESS:
    # The first metric below opens its file there: create the directory if the
    # deployment did not (several workers may race here; exist_ok makes that safe).
    os.makedirs(_DIRECTORY, exist_ok=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CACHE_HITS = Counter("cache_hits_total", "Entities served from Redis", ["entity"])
CACHE_MISSES = Counter("cache_misses_total", "Entities not found in Redis", ["entity"])
CACHE_STALE = Counter(
    "cache_stale_served_total", "Expired entities served while the CRM failed", ["entity"]
)
CACHE_REFRESHES = Counter(
    "cache_refresh_ahead_total", "Background refreshes of entries close to expiry", ["entity"]
)
CACHE_TOO_LARGE = Counter(
    "cache_values_too_large_total",
    "CRM objects served but not cached: larger than CACHE_MAX_VALUE_BYTES",
    ["entity"],
)
CACHE_INVALIDATIONS = Counter(
    "cache_invalidations_total",
    "Admin API invalidations (customer, user, or instance) that reached Redis",
    ["scope"],
)
UPSTREAM_REQUESTS = Counter(
    "upstream_requests_total", "Calls to the WhatsApp and CRM APIs", ["api", "outcome"]
)
UPSTREAM_DURATION = Histogram(
    "upstream_request_duration_seconds",
    "Duration of calls to the WhatsApp and CRM APIs",
    ["api"],
    buckets=_LATENCY_BUCKETS,
)
CRM_BATCH_SIZE = Histogram(
    "crm_batch_size",
    "Ids per CRM call",
    ["entity"],
    buckets=(1, 5, 10, 25, 50, 75, 100),
)
CRM_IDS_FETCHED = Counter("crm_ids_fetched_total", "Ids looked up in the CRM", ["entity"])
REDIS_ERRORS = Counter("redis_errors_total", "Redis commands that failed or timed out")
# Over several workers: the most recent observation of any live worker.
REDIS_UP = Gauge(
    "redis_up",
    "1 when the last Redis call succeeded, 0 when it failed",
    multiprocess_mode="livemostrecent",
)
# Over several workers: 1 while any live worker skips Redis.
REDIS_CIRCUIT_OPEN = Gauge(
    "redis_circuit_open", "1 while the breaker skips Redis", multiprocess_mode="livemax"
)
REDIS_ROUND_TRIPS = Counter("redis_round_trips_total", "Round trips to Redis", ["op"])
HTTP_REQUESTS = Counter("http_requests_total", "Requests served", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Duration of requests served",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
# Admission control (app.admission), summed over live workers.
ADMISSION_ACTIVE = Gauge(
    "admission_active",
    "/contacts requests holding a turn (reading ids and Redis, building the answer)",
    multiprocess_mode="livesum",
)
ADMISSION_QUEUED = Gauge(
    "admission_queued", "/contacts requests waiting for a turn", multiprocess_mode="livesum"
)
ADMISSION_WAITS = Counter(
    "admission_waits_total", "/contacts requests (and resumptions) that waited for a turn"
)
ADMISSION_SHED = Counter(
    "admission_shed_total", "Requests refused with 503 because they waited too long for a turn"
)
ENRICHMENT = Counter(
    "contacts_enrichment_total", "Contacts responses by enrichment state", ["state"]
)


@functools.lru_cache(maxsize=2048)
def child(metric: MetricT, *values: str) -> MetricT:
    """`metric.labels(*values)`, looked up once: `labels()` validates and locks on every call,
    several times per request. Every label here has a bounded set of values (routes,
    status codes, entities, operations), well under the cache's size."""
    return metric.labels(*values)


def observe_upstream(api: str, outcome: str, seconds: float) -> None:
    child(UPSTREAM_REQUESTS, api, outcome).inc()
    child(UPSTREAM_DURATION, api).observe(seconds)


def render(accept: str = "") -> tuple[bytes, str]:
    """This process's metrics, or every worker's in multiprocess mode, in the format `accept`
    asks for (Prometheus text 0.0.4 by default, OpenMetrics when the scraper prefers it)."""
    encode, content_type = choose_encoder(accept)
    if not MULTIPROCESS:
        return encode(REGISTRY), content_type
    forget_dead_workers()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=_DIRECTORY)  # type: ignore[no-untyped-call]
    return encode(registry), content_type


def mark_process_dead(pid: int | None = None) -> None:
    """Drop the gauges of a worker that stopped (this one by default); its counters stay."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid or os.getpid(), _DIRECTORY)  # type: ignore[no-untyped-call]


def forget_dead_workers() -> None:
    """`mark_process_dead` for every worker whose gauge files outlived it (SIGKILL, OOM).

    The directory is per machine (per container), so a pid that no longer
    exists is a worker that died without its exit hook.
    """
    for path in glob.glob(os.path.join(_DIRECTORY, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.match(os.path.basename(path))
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another worker got there first
                mark_process_dead(int(match.group(1)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if MULTIPROCESS:
    # uvicorn's workers are spawned processes that exit through the interpreter,
    # so this runs on every graceful stop; `forget_dead_workers` covers the rest.
    atexit.register(mark_process_dead)
