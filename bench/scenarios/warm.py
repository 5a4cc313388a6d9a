"""Warm cache, per page profile: CPU time per request of each target, req/s and latency.

The headline of the benchmark. For each profile (bench/profiles.py) the page
comes from nginx (a file: the upstream spends no CPU here, as a remote API
would not) and every object it references is written to Redis beforehand, the
same bytes for every target, so no target calls the CRM. That is checked
before measuring (the service says `X-Enrichment: complete`, every body is
enriched) and counted during the runs (the simulator's counters of CRM calls,
and of contacts pages, which nginx must serve alone).

Targets in turn, the order reversed every round (A B C, C B A, ...); wrk at
the profile's connections for req/s and p50/p99; the CPU time the target
process spent (all its threads, from /proc) per request served, the number to
compare two builds, or two designs, with: it does not depend on how much of
the CPUs the target got. It still moves when other work shares the machine
(by ±30 % between rounds with other test suites running), so a ratio is taken
per round, between two runs made back to back, and the median over rounds is
reported.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from bench.load import WrkResult, median, run_wrk, session, timed_get
from bench.procs import cpu_seconds, main_thread_cpu_seconds
from bench.profiles import PROFILES, Profile
from bench.scenarios.common import Context, Section, enriched_ok, fmt, settle
from bench.stack import Target

#: what the service answers when every id of the page was resolved
COMPLETE = "complete"


def is_service(target: Target) -> bool:
    """The service or a variant of it (not Node, not the pass-through)."""
    return target.name not in ("node", "passthrough")


def warm_targets(ctx: Context) -> list[str]:
    opts = ctx.options
    names = ctx.names("service", *(v.name for v in opts.variants), "node", "passthrough")
    if opts.warm_targets is not None:
        names = [n for n in names if n == "service" or n in opts.warm_targets]
    return names


async def warm(ctx: Context) -> Section:
    opts = ctx.options
    targets = [ctx.target(n) for n in warm_targets(ctx)]
    section = Section(
        "warm",
        "1. Warm cache, per page profile: CPU per request (the headline), req/s, latency",
        [
            "profile",
            "target",
            "CPU ms/req: process / main thread",
            "Node / this, CPU per req",
            "this / service, CPU per req",
            "req/s (median)",
            "req/s per round",
            "p50 ms",
            "p99 ms",
            "CRM ids fetched during runs",
            "errors",
        ],
    )
    results: dict[str, Any] = {}
    for name in opts.profiles:
        ctx.log(f"  profile {name}")
        results[name] = await _profile(ctx, PROFILES[name], targets, section)
    section.data = {
        "profiles": results,
        "wrk": {
            "duration_s": opts.duration,
            "rounds": opts.rounds,
            "warmup_s": opts.warmup,
            "connections": opts.connections,
            "threads": opts.threads,
        },
    }
    section.notes.append(
        "CRM ids: fetched from the simulator during the measured runs for the target's own"
        " instance (each target reads its own copy of the objects): 0 means truly warm."
        " Between two runs the benchmark waits until the last target is idle again (the"
        " requests wrk left queued), so that none of its work falls in the next one's run."
    )
    section.notes.append(
        f"wrk -t{opts.threads} at the connections given beside each profile, {opts.rounds}"
        f" rounds × {opts.duration:g} s per target and profile, the targets in turn, the order"
        " reversed every round. CPU"
        " ms/req: CPU time (from /proc) of the target process (all its threads) and of its"
        " main thread (the event loop) per request served. Ratios are medians of per-round"
        ' ratios; "Node / this" above 1 means this target spends less CPU per request than'
        " Node.js. Every page from nginx, every object prefilled in Redis (the same bytes for"
        " each target); the service runs `python -m app` at LOG_LEVEL=info with CRM_API_TOKEN"
        " set (keys `customer:<instance>:<id>`, those of the Node.js design)."
    )
    return section


async def _profile(
    ctx: Context, profile: Profile, targets: list[Target], section: Section
) -> dict[str, Any]:
    opts, stack = ctx.options, ctx.stack
    conns = opts.connections or profile.connections
    # An instance per target, each with its own copy of the objects: the simulator then
    # tells whose request fetched an id from the CRM.
    instances = {t.name: profile.instance(f"w{i}") for i, t in enumerate(targets)}
    keys = 0
    for target in targets:
        if target.redis_db is not None:
            keys = stack.prefill(profile, instances[target.name], (target.redis_db,))
    paths = {name: f"/contacts?instance={instance}" for name, instance in instances.items()}

    checked = {t.name: await _check(t, paths[t.name], profile) for t in targets}
    bodies = {n: c["body"] for n, c in checked.items() if "body" in c}
    same = "node" not in bodies or bodies["node"] == bodies["service"]

    if opts.warmup > 0:
        for target in targets:
            await run_wrk(
                target.url + paths[target.name], duration=opts.warmup, connections=conns,
                threads=opts.threads,
            )  # fmt: skip
            await until_idle(target)

    stack.sim.reset()  # count the measured runs only
    runs: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
    cpu_ms: dict[str, list[float]] = {t.name: [] for t in targets}
    main_ms: dict[str, list[float]] = {t.name: [] for t in targets}
    for round_no in range(opts.rounds):
        order = targets if round_no % 2 == 0 else targets[::-1]
        for target in order:
            cpu_before = cpu_seconds(target.child.pid)
            main_before = main_thread_cpu_seconds(target.child.pid)
            result = await run_wrk(
                target.url + paths[target.name], duration=opts.duration, connections=conns,
                threads=opts.threads,
            )  # fmt: skip
            cpu = cpu_seconds(target.child.pid) - cpu_before
            main = main_thread_cpu_seconds(target.child.pid) - main_before
            await until_idle(target)
            runs[target.name].append(result)
            per_request = 1000 / result.requests if result.requests else 0.0
            cpu_ms[target.name].append(cpu * per_request)
            main_ms[target.name].append(main * per_request)
            ctx.log(
                f"  round {round_no + 1} {profile.name:6} {target.name:14}"
                f" {result.rps:8,.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                f"  p99 {result.p99_ms:6.2f} ms  CPU {cpu_ms[target.name][-1]:5.2f} ms/req"
                f" (main thread {main_ms[target.name][-1]:5.2f})"
                + (f"  ERRORS {result.errors}" if result.errors else "")
            )
    stats = stack.sim.stats()
    sim_pages = stats["calls"]["contacts"]
    crm_ids = {t.name: stack.sim.ids_fetched(instances[t.name]) for t in targets}

    def cpu_ratio(numerator: str, denominator: str) -> float | None:
        if numerator not in cpu_ms or denominator not in cpu_ms:
            return None
        pairs = zip(cpu_ms[numerator], cpu_ms[denominator], strict=True)
        return median([n / d for n, d in pairs if d > 0])

    summary: dict[str, Any] = {}
    enriched = checked["service"].get("bytes", 0)
    for target in targets:
        results = runs[target.name]
        row = {
            "label": target.label,
            "instance": instances[target.name],
            "cpu_ms_per_request": median(cpu_ms[target.name]),
            "cpu_ms_per_request_rounds": cpu_ms[target.name],
            "main_thread_cpu_ms_per_request": median(main_ms[target.name]),
            "node_cpu_over_this": (
                None if target.name == "node" else cpu_ratio("node", target.name)
            ),
            "cpu_over_service": (
                None if target.name == "service" else cpu_ratio(target.name, "service")
            ),
            "rps": median([r.rps for r in results]),
            "p50_ms": median([r.p50_ms for r in results]),
            "p99_ms": median([r.p99_ms for r in results]),
            "errors": sum(r.errors for r in results),
            "crm_ids_fetched_during_runs": crm_ids[target.name],
            "x_enrichment": checked[target.name]["enrichment"],
            "rounds": [r.as_dict() for r in results],
        }
        summary[target.name] = row
        section.rows.append(
            [
                f"{profile.name} ({enriched / 1000:,.0f} KB, -c{conns})",
                target.label,
                f"{row['cpu_ms_per_request']:.3f} / {row['main_thread_cpu_ms_per_request']:.3f}",
                _ratio(row["node_cpu_over_this"]),
                _ratio(row["cpu_over_service"]),
                fmt(row["rps"], 0),
                " / ".join(fmt(r.rps, 0) for r in results),
                fmt(row["p50_ms"], 2),
                fmt(row["p99_ms"], 2),
                str(row["crm_ids_fetched_during_runs"]),
                str(row["errors"]),
            ]
        )
    cids, uids = profile.referenced()
    if not same:
        section.notes.append(f"WARNING: {profile.name}: the service's and Node's pages differ.")
    if any(crm_ids.values()) or sim_pages:
        section.notes.append(
            f"WARNING: {profile.name}: not all warm: CRM ids fetched during the runs {crm_ids},"
            f" contacts pages asked of the simulator {sim_pages}."
        )
    return {
        "summary": profile.summary,
        "contacts": profile.contacts,
        "connections": conns,
        "ids": len(cids) + len(uids),
        "prefilled_keys": keys,
        "page_bytes": len(profile.page()),
        "enriched_bytes": enriched,
        "bodies_equal_service_node": same,
        "sim_contacts_calls_during_runs": sim_pages,
        "node_cpu_over_service": cpu_ratio("node", "service"),
        "targets": summary,
    }


async def until_idle(target: Target, timeout: float = 15.0) -> None:
    """Until the target's process is (nearly) idle: requests wrk left queued when it stopped
    must not run during the next target's measure."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(target.child.pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = cpu_seconds(target.child.pid)
        if now - before <= 0.011:  # at most one clock tick in 100 ms
            return
        before = now


async def _check(target: Target, path: str, profile: Profile) -> dict[str, Any]:
    """Before measuring: the page is served, enriched and warm (the service says complete)."""
    async with session() as http:
        for _ in range(2):
            reply = await timed_get(http, target.url + path)
            await settle(0.05)
    if reply.status != 200:
        raise RuntimeError(f"{target.name}: {path} answered {reply.status}")
    enrichment = reply.headers.get("x-enrichment") or reply.headers.get("X-Enrichment")
    out: dict[str, Any] = {"enrichment": enrichment}
    if target.name == "passthrough":
        return out
    if is_service(target) and enrichment != COMPLETE:
        raise RuntimeError(f"{target.name}: {path} is not warm (X-Enrichment: {enrichment})")
    if not enriched_ok(reply.body, profile.contacts):
        raise RuntimeError(f"{target.name}: {path} is not enriched")
    out["body"] = orjson.loads(reply.body)
    out["bytes"] = len(reply.body)
    return out


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"
