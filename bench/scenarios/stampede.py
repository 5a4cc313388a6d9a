"""Stampede: many concurrent cold requests over a few pages of one new instance: CRM ids
fetched per unique id, counted by the simulator (single flight and leases at work)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp

from bench.load import median, percentile, session, timed_get
from bench.scenarios.common import (
    DEFAULT_CUSTOMERS,
    DEFAULT_USERS,
    Context,
    Section,
    contacts_path,
    fmt,
    ms,
    settle,
)


async def stampede(ctx: Context) -> Section:
    opts, sim = ctx.options, ctx.stack.sim
    sim.configure(
        latency_ms={"contacts": opts.contacts_ms, "customers": opts.crm_ms, "users": opts.crm_ms},
        users=DEFAULT_USERS,
        customers=DEFAULT_CUSTOMERS,
    )
    names = ctx.names("service", *(v.name for v in opts.variants), "node", "service-noredis")
    run_id = uuid.uuid4().hex[:6]
    section = Section(
        "stampede",
        f"6. Stampede: {opts.stampede} concurrent cold requests over {opts.stampede_pages}"
        f" pages of {opts.page_size}",
        [
            "target",
            "CRM ids fetched / unique id",
            "max fetches of one id",
            "CRM calls",
            "p50 ms",
            "p99 ms",
            "wall ms",
            "non-200",
        ],
    )
    results: dict[str, Any] = {}
    async with session(limit=opts.stampede + 8, timeout=60) as http:
        for name in names:
            target = ctx.target(name)
            instance = f"stampede-{run_id}-{name}"
            # open the connections first, so the burst is of requests, not of handshakes
            await _burst(http, target.url + "/health", opts.stampede)
            sim.reset()
            paths = [
                contacts_path(instance, opts.page_size, 1 + i % opts.stampede_pages)
                for i in range(opts.stampede)
            ]
            started = time.perf_counter()
            replies = await asyncio.gather(*(timed_get(http, target.url + p) for p in paths))
            wall = ms(time.perf_counter() - started)
            await settle(0.3)
            stats = sim.stats()
            fetched = sum(stats["ids_requested"].values())
            unique = sum(stats["unique_ids_requested"].values())
            latencies = [ms(r.seconds) for r in replies]
            results[name] = {
                "label": target.label,
                "ids_fetched": fetched,
                "unique_ids": unique,
                "fetches_per_unique_id": fetched / unique if unique else 0.0,
                "max_fetches_per_id": max(stats["max_fetches_per_id"].values()),
                "crm_calls": stats["calls"]["customers"] + stats["calls"]["users"],
                "contacts_calls": stats["calls"]["contacts"],
                "p50_ms": median(latencies),
                "p99_ms": percentile(latencies, 99),
                "wall_ms": wall,
                "non_200": sum(1 for r in replies if r.status != 200),
            }
            r = results[name]
            section.rows.append(
                [
                    target.label,
                    f"{r['fetches_per_unique_id']:.2f}",
                    str(r["max_fetches_per_id"]),
                    str(r["crm_calls"]),
                    fmt(r["p50_ms"]),
                    fmt(r["p99_ms"]),
                    fmt(wall, 0),
                    str(r["non_200"]),
                ]
            )
    section.data = {"targets": results, "requests": opts.stampede, "pages": opts.stampede_pages}
    section.notes.append(
        f"All {opts.stampede} requests sent at once (connections opened beforehand), page"
        f" 1 + i % {opts.stampede_pages}, a new instance per target; CRM {opts.crm_ms:g} ms."
        " Ids counted by the simulator."
    )
    return section


async def _burst(http: aiohttp.ClientSession, url: str, n: int) -> None:
    async def one() -> None:
        async with http.get(url) as response:
            await response.read()

    await asyncio.gather(*(one() for _ in range(n)))
