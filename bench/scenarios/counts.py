"""Counted, not estimated: Redis commands and round trips, CRM calls and ids per request,
warm, warm with an unknown id, and cold (the simulator's pages, through nginx)."""

from __future__ import annotations

import uuid
from typing import Any

from bench.load import session, timed_get
from bench.scenarios.common import (
    ADMIN_COMMANDS,
    DEFAULT_CUSTOMERS,
    WARM_USERS,
    Context,
    Section,
    clean_page,
    contacts_path,
    redis_reset,
    redis_snapshot,
    service_round_trips,
    settle,
)


async def counts(ctx: Context) -> Section:
    opts, stack = ctx.options, ctx.stack
    sim = stack.sim
    sim.configure(
        latency_ms={"contacts": 0, "customers": 0, "users": 0},
        users=WARM_USERS,
        customers=DEFAULT_CUSTOMERS,
    )
    n = opts.count_requests
    names = ctx.names("service", "node", "service-noredis")
    run_id = uuid.uuid4().hex[:6]
    section = Section(
        "counts",
        f"3. Per request, counted (page of {opts.page_size}; {n} requests per row)",
        [
            "target",
            "case",
            "Redis commands",
            "Redis socket reads",
            "service round trips",
            "CRM calls",
            "CRM ids",
        ],
    )
    rows: list[dict[str, Any]] = []
    async with session() as http:
        for name in names:
            target = ctx.target(name)
            instance = f"counts-{run_id}-{name}"
            clean = clean_page(instance, opts.page_size, DEFAULT_CUSTOMERS, WARM_USERS)
            # (case, instance, page or None: a new instance per request)
            cases: list[tuple[str, str, int | None]] = [
                ("warm, every id exists", instance, clean),
                ("warm, page with an unknown id", instance, 1),
                ("cold (new instance each)", f"{instance}-cold", None),
            ]
            for case, case_instance, page in cases:

                def make_path(i: int, inst: str = case_instance, page: int | None = page) -> str:
                    if page is None:
                        return contacts_path(f"{inst}-{i}", opts.page_size, 1)
                    return contacts_path(inst, opts.page_size, page)

                if page is not None:
                    await timed_get(http, target.url + make_path(0))
                await settle(0.3)
                redis_reset(stack)
                sim.reset()
                trips_before = service_round_trips(target)
                for i in range(n):
                    reply = await timed_get(http, target.url + make_path(i))
                    if reply.status != 200:
                        raise RuntimeError(f"{name}: {make_path(i)} answered {reply.status}")
                await settle(0.3)
                trips_after = service_round_trips(target)
                snap = redis_snapshot(stack)
                stats = sim.stats()
                commands = {k: v for k, v in snap.items() if k != "_reads"}
                ours = {k: v for k, v in commands.items() if k not in ADMIN_COMMANDS}
                # the snapshot's own INFO is one read; nothing else of ours ran since the reset
                reads = max(0, snap["_reads"] - 1)
                crm = stats["calls"]["customers"] + stats["calls"]["users"]
                ids = sum(stats["ids_requested"].values())
                trips = (
                    None
                    if trips_before is None or trips_after is None
                    else (trips_after - trips_before) / n
                )
                row = {
                    "target": target.label,
                    "name": name,
                    "case": case,
                    "requests": n,
                    "redis_commands": {k: v / n for k, v in sorted(ours.items())},
                    "redis_commands_total": sum(ours.values()) / n,
                    "redis_reads": reads / n,
                    "service_round_trips": trips,
                    "crm_calls": crm / n,
                    "crm_ids": ids / n,
                    "contacts_calls": stats["calls"]["contacts"] / n,
                }
                rows.append(row)
                by_command = ", ".join(f"{k} {v:g}" for k, v in row["redis_commands"].items())
                section.rows.append(
                    [
                        target.label,
                        case,
                        f"{row['redis_commands_total']:g}" + (f" ({by_command})" if ours else ""),
                        f"{row['redis_reads']:g}",
                        "—" if trips is None else f"{trips:g}",
                        f"{row['crm_calls']:g}",
                        f"{row['crm_ids']:g}",
                    ]
                )
    section.data = {"rows": rows}
    section.notes.append(
        "Redis commands from `INFO commandstats` and socket reads from `total_reads_processed`"
        " (after `CONFIG RESETSTAT`; one read is a round trip, a large pipeline may take a few);"
        ' "service round trips" is the service\'s own `redis_round_trips_total`; CRM calls'
        " and ids from the simulator's counters. The Node.js design does not cache \"does not"
        ' exist", so it asks the CRM again for an unknown id on every request.'
    )
    return section
