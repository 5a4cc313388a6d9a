"""Overload: the light profile's warm page at several times the warm scenario's load, with
and without the admission limit: throughput, shedding, and what saturation does to Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.load import WrkResult, median, run_wrk, session, timed_get
from bench.profiles import PROFILES
from bench.scenarios.common import (
    UNLIMITED,
    Context,
    Section,
    fmt,
    service_counters,
    settle,
)

#: the page of the overload runs: the lightest, the most requests per second
OVERLOAD_PROFILE = "light"
#: what the overload scenario reads from each service's /metrics around a run
_OVERLOAD_COUNTERS = (
    "redis_errors_total",
    "cache_misses_total",
    "crm_ids_fetched_total",
    "admission_shed_total",
)


async def overload(ctx: Context) -> Section:
    """The light profile's page, cached, at several times the warm scenario's load, with and
    without the admission limit (MAX_ACTIVE_REQUESTS): what saturation does to Redis reads."""
    opts = ctx.options
    profile = PROFILES[OVERLOAD_PROFILE]
    ctx.stack.prefill(profile, profile.instance(), dbs=(0,))  # every service here uses db 0
    path = f"/contacts?instance={profile.instance()}"
    names = ["service", "service-unlimited", *(v.name for v in opts.variants)]
    targets = [ctx.target(n) for n in names]
    async with session() as http:
        for target in targets:
            for _ in range(2):
                reply = await timed_get(http, target.url + path)
                if reply.status != 200:
                    raise RuntimeError(f"{target.name}: {path} answered {reply.status}")
                await settle(0.1)
    conns = opts.overload_connections
    runs: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
    deltas: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    for round_no in range(opts.rounds):
        for target in targets:
            before = await asyncio.to_thread(service_counters, target, *_OVERLOAD_COUNTERS)
            result = await run_wrk(
                target.url + path, duration=opts.duration, connections=conns, threads=opts.threads
            )
            await settle(0.5)  # let the background work of a saturated run finish, and count it
            after = await asyncio.to_thread(service_counters, target, *_OVERLOAD_COUNTERS)
            runs[target.name].append(result)
            deltas[target.name].append({k: after[k] - before[k] for k in after})
            ctx.log(
                f"  round {round_no + 1} {target.name:18} {result.rps:9,.0f} req/s"
                f"  p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms"
                f"  Redis errors {deltas[target.name][-1]['redis_errors_total']:g}"
                + (f"  ERRORS {result.errors}" if result.errors else "")
            )
    section = Section(
        "overload",
        f"7. Overload: the {OVERLOAD_PROFILE} page, cached, at {conns} connections",
        [
            "target",
            "req/s (median)",
            "req/s per round",
            "p50 ms",
            "p99 ms",
            "Redis errors",
            "ids read as misses / request",
            "CRM ids fetched",
            "shed (503)",
            "goodput req/s",
            "HTTP errors",
        ],
    )
    summary: dict[str, Any] = {}
    for target in targets:
        results, counted = runs[target.name], deltas[target.name]
        requests = sum(r.requests for r in results)
        row: dict[str, Any] = {
            "label": target.label,
            "rps": median([r.rps for r in results]),
            "rps_rounds": [r.rps for r in results],
            "p50_ms": median([r.p50_ms for r in results]),
            "p99_ms": median([r.p99_ms for r in results]),
            "redis_errors": sum(d["redis_errors_total"] for d in counted),
            "misses_per_request": (
                sum(d["cache_misses_total"] for d in counted) / requests if requests else 0.0
            ),
            "crm_ids_fetched": sum(d["crm_ids_fetched_total"] for d in counted),
            "shed": sum(d["admission_shed_total"] for d in counted),
            "goodput": median(
                [
                    r.rps * (1 - d["admission_shed_total"] / r.requests) if r.requests else 0.0
                    for r, d in zip(results, counted, strict=True)
                ]
            ),
            "http_errors": sum(r.errors for r in results),
            "requests": requests,
        }
        summary[target.name] = row
        section.rows.append(
            [
                target.label,
                f"{row['rps']:,.0f}",
                " / ".join(f"{r:,.0f}" for r in row["rps_rounds"]),
                fmt(row["p50_ms"]),
                fmt(row["p99_ms"]),
                f"{row['redis_errors']:g}",
                f"{row['misses_per_request']:.2f}",
                f"{row['crm_ids_fetched']:g}",
                f"{row['shed']:g}",
                f"{row['goodput']:,.0f}",
                str(row["http_errors"]),
            ]
        )
    ratios = [
        a.rps / b.rps
        for a, b in zip(runs["service"], runs["service-unlimited"], strict=True)
        if b.rps
    ]
    ratio = median(ratios) if ratios else float("nan")
    section.data = {"targets": summary, "connections": conns, "service_vs_unlimited": ratio}
    section.notes.append(
        f"wrk -c{conns} for {opts.duration:g} s per round, {opts.rounds} rounds in turn, on the"
        f" cached {OVERLOAD_PROFILE} page (from nginx, every id in Redis); counters from each"
        " service's /metrics. `service`"
        " runs with the default MAX_ACTIVE_REQUESTS; the other with no effective limit"
        f" ({UNLIMITED:,}). Throughput, service / no limit: {ratio:.2f}× (median of"
        " per-round ratios). Shed: requests refused with 503 after"
        " ADMISSION_QUEUE_TIMEOUT_SECONDS (admission_shed_total); goodput: req/s less those."
        " wrk's latencies include the shed replies."
    )
    return section
