"""Cold cache: a page of the cold profile (1,000 contacts) for a new instance per request,
CRM 20 ms per call; each target's overhead over the same upstream calls made directly.

The contacts page comes from nginx (any instance named `<profile>-...` gets
the profile's file), the CRM from the simulator, with its latency. Before each
sample the benchmark itself makes the calls any design must make, straight to
the upstreams: the page, then every CRM batch of its distinct ids at once
(batches of 100, as both designs send them). That is the floor; a target's
overhead is its p50 minus the floor's p50, in the same run, and the headline
is the service's overhead over Node's.

The simulator is one Python process that renders the CRM batches one after
the other, so the floor is more than one CRM latency; it is the same for every
target, and measured.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from statistics import fmean
from typing import Any

import aiohttp
import orjson

from bench.load import median, percentile, session, timed_get
from bench.profiles import PROFILES
from bench.scenarios.common import (
    DEFAULT_CUSTOMERS,
    WARM_USERS,
    Context,
    Section,
    fmt,
    ms,
    settle,
)

#: ids per CRM call, in the service (UPSTREAM_BATCH_SIZE) and in the Node.js design
BATCH = 100
DIRECT = "upstream"


async def cold(ctx: Context) -> Section:
    opts, stack = ctx.options, ctx.stack
    profile = PROFILES[opts.cold_profile]
    stack.sim.configure(
        latency_ms={"contacts": 0, "customers": opts.crm_ms, "users": opts.crm_ms},
        users=WARM_USERS,
        customers=DEFAULT_CUSTOMERS,
    )
    names = ctx.names("service", *(v.name for v in opts.variants), "node")
    targets = [ctx.target(n) for n in names]
    run_id = uuid.uuid4().hex[:6]
    times: dict[str, list[float]] = {name: [] for name in [DIRECT, *names]}
    crm_calls: dict[str, list[int]] = {name: [] for name in [DIRECT, *names]}
    partial = 0
    async with session() as http:
        for sample in range(-1, opts.cold_samples):  # sample -1 opens connections, not counted
            order = targets if sample % 2 == 0 else targets[::-1]
            seconds, batches = await _direct(
                http,
                stack.contacts_url,
                stack.sim.url,
                profile.instance(f"c{run_id}-d{sample + 1}"),
            )
            if sample >= 0:
                times[DIRECT].append(ms(seconds))
                crm_calls[DIRECT].append(batches)
            await settle(0.05)
            for target in order:
                instance = profile.instance(f"c{run_id}-{names.index(target.name)}-{sample + 1}")
                before = stack.sim.stats()["calls"]
                reply = await timed_get(http, f"{target.url}/contacts?instance={instance}")
                after = stack.sim.stats()["calls"]
                if reply.status != 200:
                    raise RuntimeError(f"{target.name}: cold page answered {reply.status}")
                if target.name != "node" and reply.headers.get("x-enrichment") != "complete":
                    partial += 1
                if sample >= 0:
                    times[target.name].append(ms(reply.seconds))
                    crm_calls[target.name].append(
                        after["customers"] + after["users"] - before["customers"] - before["users"]
                    )
                await settle(0.1)  # the target's cache writes, off the next one's clock

    floor = median(times[DIRECT])
    overhead = {name: median(times[name]) - floor for name in names}
    node_overhead = overhead.get("node")

    def over_node(name: str) -> float | None:
        if node_overhead is None or node_overhead <= 0 or name == "node":
            return None
        return overhead[name] / node_overhead

    section = Section(
        "cold",
        f"2. Cold cache: the {profile.name} page ({profile.contacts:,} contacts) of a new"
        f" instance per request, CRM {opts.crm_ms:g} ms",
        [
            "target",
            "p50 ms",
            "p90 ms",
            "max ms",
            "CRM calls/req",
            "overhead: p50 − upstream called directly",
            "overhead / Node's",
        ],
    )
    labels = {t.name: t.label for t in targets} | {
        DIRECT: "upstream called directly: the page, then all CRM batches at once"
    }
    summary: dict[str, Any] = {}
    for name in [DIRECT, *names]:
        values = times[name]
        row: dict[str, Any] = {
            "label": labels[name],
            "p50_ms": median(values),
            "p90_ms": percentile(values, 90),
            "max_ms": max(values, default=0.0),
            "samples_ms": values,
            "crm_calls_per_request": median([float(c) for c in crm_calls[name]]),
            "overhead_ms": overhead.get(name),
            "overhead_over_node": None if name == DIRECT else over_node(name),
        }
        summary[name] = row
        section.rows.append(
            [
                labels[name],
                fmt(row["p50_ms"], 1),
                fmt(row["p90_ms"], 1),
                fmt(row["max_ms"], 1),
                fmt(row["crm_calls_per_request"], 0),
                "—" if row["overhead_ms"] is None else f"{row['overhead_ms']:+.1f} ms",
                "—" if row["overhead_over_node"] is None else f"{row['overhead_over_node']:.2f}×",
            ]
        )
    section.data = {
        "profile": profile.name,
        "contacts": profile.contacts,
        "targets": summary,
        "upstream_direct_ms": floor,
        "crm_ms": opts.crm_ms,
        "service_overhead_ms": overhead["service"],
        "node_overhead_ms": node_overhead,
        "service_overhead_over_node": over_node("service"),
        "partial_responses": partial,
        "paired_vs_service": _paired(times, [v.name for v in opts.variants]),
    }
    for name, paired in section.data["paired_vs_service"].items():
        section.notes.append(
            f"Paired (request n of each, sent back to back): {name} − service, median"
            f" {paired['median_ms']:+.2f} ms, mean {paired['mean_ms']:+.2f} ms over"
            f" {paired['pairs']} pairs."
        )
    ratio = section.data["service_overhead_over_node"]
    section.notes.append(
        f"{opts.cold_samples} requests per target, in turn (the order reversed every sample),"
        " each for a new instance (nothing cached); the page from nginx, the CRM from the"
        f" simulator ({opts.crm_ms:g} ms per call). Overhead: a target's p50 minus the p50 of"
        " the same calls made straight from the benchmark."
        + ("" if ratio is None else f" Service overhead / Node's overhead: {ratio:.2f}×.")
        + (f" WARNING: {partial} service replies were partial." if partial else "")
    )
    return section


def _paired(times: dict[str, list[float]], variants: list[str]) -> dict[str, dict[str, float]]:
    """Each variant minus the service, request by request: the requests of one sample run
    back to back, so the machine's slow spells hit both sides of a pair alike."""
    out: dict[str, dict[str, float]] = {}
    for name in variants:
        diffs = [v - s for v, s in zip(times[name], times["service"], strict=False)]
        if diffs:
            out[name] = {"median_ms": median(diffs), "mean_ms": fmean(diffs), "pairs": len(diffs)}
    return out


async def _direct(
    http: aiohttp.ClientSession, contacts_url: str, crm_url: str, instance: str
) -> tuple[float, int]:
    """The contacts call, then every CRM batch of its distinct ids at once; (seconds, calls)."""
    started = time.perf_counter()
    reply = await timed_get(http, f"{contacts_url}/{instance}/contacts")
    items = orjson.loads(reply.body)["data"]
    wanted = {
        "customers": list(
            dict.fromkeys(str(c["customerId"]) for c in items if c["customerId"] is not None)
        ),
        "users": list(dict.fromkeys(str(c["userId"]) for c in items if c["userId"] is not None)),
    }
    urls = [
        f"{crm_url}/{instance}/{api}?ids={','.join(ids[i : i + BATCH])}"
        for api, ids in wanted.items()
        for i in range(0, len(ids), BATCH)
    ]
    replies = await asyncio.gather(*(timed_get(http, url) for url in urls))
    if any(r.status != 200 for r in [reply, *replies]):
        raise RuntimeError(f"the upstream called directly failed for {instance}")
    return time.perf_counter() - started, len(urls)
