"""Prometheus metrics (names fixed by SPEC.md) and the `/metrics` rendering.

With `PROMETHEUS_MULTIPROC_DIR` set (several uvicorn workers), every process
writes its samples there and `/metrics` aggregates them, so any worker that
answers the scrape reports the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CACHE_HITS = Counter("cache_hits_total", "Entities served from Redis", ["entity"])
CACHE_MISSES = Counter("cache_misses_total", "Entities not found in Redis", ["entity"])
CACHE_STALE = Counter(
    "cache_stale_served_total", "Expired entities served while the CRM failed", ["entity"]
)
CACHE_REFRESHES = Counter(
    "cache_refresh_ahead_total", "Background refreshes of entries close to expiry", ["entity"]
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
REDIS_UP = Gauge(
    "redis_up", "1 when the last Redis call succeeded, 0 when it failed", multiprocess_mode="max"
)
REDIS_CIRCUIT_OPEN = Gauge(
    "redis_circuit_open", "1 while the breaker skips Redis", multiprocess_mode="max"
)
REDIS_ROUND_TRIPS = Counter("redis_round_trips_total", "Round trips to Redis", ["op"])
HTTP_REQUESTS = Counter("http_requests_total", "Requests served", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Duration of requests served",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
ENRICHMENT = Counter(
    "contacts_enrichment_total", "Contacts responses by enrichment state", ["state"]
)


def observe_upstream(api: str, outcome: str, seconds: float) -> None:
    UPSTREAM_REQUESTS.labels(api=api, outcome=outcome).inc()
    UPSTREAM_DURATION.labels(api=api).observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
