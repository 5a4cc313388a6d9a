"""Memory: a fresh service (and Node.js reference) looks up many distinct customers; RSS
at start, after the first pages and at the end, and Redis memory per 100k customers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from bench.load import session, timed_get
from bench.procs import rss_kib
from bench.scenarios.common import (
    DEFAULT_USERS,
    Context,
    Section,
    contacts_path,
    fmt,
    settle,
)
from bench.stack import Target


async def memory(ctx: Context) -> Section:
    opts, stack = ctx.options, ctx.stack
    goal = opts.memory_customers
    per_page = opts.page_size
    parallel = 4
    # ~1 contact in 11 has no customer: give the tenant enough customers to reach the goal.
    customers = int(goal * 1.2) + per_page
    stack.sim.configure(
        latency_ms={"contacts": 0, "customers": 0, "users": 0},
        users=DEFAULT_USERS,
        customers=customers,
    )
    starters: list[tuple[str, Callable[[], Target]]] = [
        ("service", lambda: stack.start_service("service-mem", db=2)),
    ]
    if not opts.skip_node:
        starters.append(("node", lambda: stack.start_node("node-mem", db=3)))
    section = Section(
        "memory",
        f"4. Memory: {goal:,} distinct customers looked up",
        [
            "target",
            "RSS at start MiB",
            "after first pages MiB",
            f"after {goal // 1000}k MiB",
            "growth MiB",
            "Redis used_memory Δ MiB",
            "Redis MiB per 100k customers",
        ],
    )
    results: dict[str, Any] = {}
    for name, start in starters:
        db = 2 if name == "service" else 3
        redis = stack.redis_db(db)
        redis.flushdb()
        target = start()
        ctx.log(f"  driving {target.name} to {goal:,} distinct customers")
        rss_start = rss_kib(target.child.pid)
        used_before = int(stack.admin.info("memory")["used_memory"])
        instance = f"mem-{uuid.uuid4().hex[:6]}"
        seen: set[object] = set()
        rss_first = 0
        started = time.perf_counter()
        async with session() as http:
            page = 1
            while len(seen) < goal and page * per_page <= customers + per_page:
                batch = [page + k for k in range(parallel)]
                page += len(batch)
                replies = await asyncio.gather(
                    *(
                        timed_get(http, target.url + contacts_path(instance, per_page, p))
                        for p in batch
                    )
                )
                for reply in replies:
                    if reply.status != 200:
                        raise RuntimeError(f"{target.name}: memory page answered {reply.status}")
                    for item in orjson.loads(reply.body)["data"]:
                        if item["customerId"] is not None:
                            seen.add(item["customerId"])
                if not rss_first:
                    rss_first = rss_kib(target.child.pid)
        drive_seconds = time.perf_counter() - started
        await settle(1.0)
        rss_end = rss_kib(target.child.pid)
        used_after = int(stack.admin.info("memory")["used_memory"])
        cached_customers = sum(1 for _ in redis.scan_iter(match="customer:*", count=10_000))
        redis.close()
        delta = used_after - used_before
        per_100k = delta / cached_customers * 100_000 if cached_customers else 0.0
        results[name] = {
            "label": target.label,
            "distinct_customers": len(seen),
            "cached_customer_keys": cached_customers,
            "rss_start_kib": rss_start,
            "rss_first_kib": rss_first,
            "rss_end_kib": rss_end,
            "rss_growth_kib": rss_end - rss_start,
            "rss_growth_since_first_kib": rss_end - rss_first,
            "redis_used_memory_delta_bytes": delta,
            "redis_bytes_per_100k_customers": per_100k,
            "drive_seconds": drive_seconds,
        }
        section.rows.append(
            [
                target.label,
                fmt(rss_start / 1024),
                fmt(rss_first / 1024),
                fmt(rss_end / 1024),
                f"{(rss_end - rss_start) / 1024:+.1f}",
                fmt(delta / 2**20),
                fmt(per_100k / 2**20),
            ]
        )
        stack.children.stop(target.child)
    section.data = {"targets": results, "page_size": per_page, "goal": goal}
    section.notes.append(
        f"A fresh process each; pages of {per_page} contacts ({parallel} at a time) until {goal:,}"
        " distinct customer ids were resolved. RSS from /proc; Redis `used_memory` before and"
        " after (unknown ids are cached as `null` and counted among the customer keys)."
    )
    return section
