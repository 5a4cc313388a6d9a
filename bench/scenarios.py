"""The scenarios of issue 4, and overload. Each returns a `Section`: a table, its numbers, notes.

Every comparison is made inside one run, the competitors measured in turn
(A B C D, A B C D, ...), and reported as the median of the rounds and the
median of the per-round ratios, because the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import aiohttp
import orjson

from bench.load import WrkResult, median, percentile, run_wrk, session, timed_get
from bench.procs import cpu_seconds, main_thread_cpu_seconds, rss_kib
from bench.stack import Stack, Target
from simupstream import data

#: Agents per tenant in the warm and counts scenarios: with the sim's default of 50,
#: every page of 100 references the nonexistent user 51, which the Node.js design
#: (no negative caching) fetches from the CRM on every request.
WARM_USERS = 100
DEFAULT_USERS = data.DEFAULT_USERS
DEFAULT_CUSTOMERS = data.DEFAULT_CUSTOMERS
#: MAX_ACTIVE_REQUESTS of the service without admission control (overload scenario)
UNLIMITED = 1_000_000
#: Redis commands the benchmark itself sends (excluded from the counts).
_ADMIN_COMMANDS = {
    "info",
    "config|resetstat",
    "config",
    "ping",
    "flushdb",
    "dbsize",
    "scan",
    "hello",
}


@dataclass(frozen=True)
class Variant:
    """Another build of the service for A/B runs: `app` from `folder`, with extra environment."""

    name: str
    folder: str
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Options:
    duration: float = 5.0
    #: seconds of the one-connection latency run that follows each saturated run
    latency_duration: float = 3.0
    rounds: int = 3
    warmup: float = 2.0
    connections: int = 64
    threads: int = 1
    page_size: int = 100
    cold_page_size: int = 1000
    cold_samples: int = 15
    count_requests: int = 20
    startup_runs: int = 5
    stampede: int = 200
    stampede_pages: int = 4
    memory_customers: int = 100_000
    #: wrk connections of the overload scenario: four times the warm scenario's
    overload_connections: int = 256
    contacts_ms: float = 5.0
    crm_ms: float = 20.0
    skip_node: bool = False
    #: extra services in the warm, cold and stampede scenarios (A/B runs)
    variants: tuple[Variant, ...] = ()
    #: which targets the warm scenario measures (None: all); "service" is always kept
    warm_targets: tuple[str, ...] | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        values: dict[str, Any] = {
            "duration": 1.0,
            "latency_duration": 1.0,
            "rounds": 1,
            "warmup": 0.0,
            "connections": 16,
            "cold_page_size": 200,
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
    _targets: dict[str, Target] = field(default_factory=dict)

    # The long-lived targets, started on first use; each service/node with its own Redis db.
    def target(self, name: str) -> Target:
        if name not in self._targets:
            self.log(f"  starting {name}")
            stack = self.stack
            variants = {v.name: v for v in self.options.variants}
            if name in variants:
                variant = variants[name]
                self._targets[name] = stack.start_service(
                    name,
                    db=0,
                    source=Path(variant.folder).resolve(),
                    label=f"service [{name}]",
                    env=dict(variant.env),
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


def _ms(seconds: float) -> float:
    return seconds * 1000


# -- 1. warm cache ---------------------------------------------------------------------------


def warm_page(ctx: Context) -> str:
    """The warm scenarios' page (every id exists), with the simulator set up for it."""
    ctx.stack.sim.configure(
        latency_ms={"contacts": 0, "customers": 0, "users": 0},
        users=WARM_USERS,
        customers=DEFAULT_CUSTOMERS,
    )
    instance, size = "bench-warm", ctx.options.page_size
    return contacts_path(instance, size, clean_page(instance, size, DEFAULT_CUSTOMERS, WARM_USERS))


async def warm(ctx: Context) -> Section:
    opts = ctx.options
    path = warm_page(ctx)
    variants = [v.name for v in opts.variants]
    names = ctx.names("service", *variants, "node", "service-noredis", "passthrough")
    if opts.warm_targets is not None:
        names = [n for n in names if n == "service" or n in opts.warm_targets]
    targets = [ctx.target(n) for n in names]

    bodies: dict[str, Any] = {}
    async with session() as http:
        for target in targets:
            for _ in range(3):  # the first fills the cache; the next are warm
                reply = await timed_get(http, target.url + path)
                await settle(0.1)
            if reply.status != 200:
                raise RuntimeError(f"{target.name}: {path} answered {reply.status}")
            if target.name != "passthrough" and not enriched_ok(reply.body, opts.page_size):
                raise RuntimeError(f"{target.name}: the page is not enriched")
            bodies[target.name] = orjson.loads(reply.body)
    same = "node" not in bodies or bodies["node"] == bodies["service"]
    same_noredis = bodies.get("service-noredis", bodies["service"]) == bodies["service"]

    if opts.warmup > 0:
        for target in targets:
            await run_wrk(
                target.url + path, duration=opts.warmup, connections=opts.connections,
                threads=opts.threads,
            )  # fmt: skip

    runs: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
    # The same page one request at a time: latency without queueing.
    single: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
    # CPU time of the target process (all its threads) per request served: unlike
    # req/s, hardly moved by what else runs on the machine.
    cpu_ms: dict[str, list[float]] = {t.name: [] for t in targets}
    main_ms: dict[str, list[float]] = {t.name: [] for t in targets}
    for round_no in range(opts.rounds):
        for target in targets:
            cpu_before = cpu_seconds(target.child.pid)
            main_before = main_thread_cpu_seconds(target.child.pid)
            result = await run_wrk(
                target.url + path, duration=opts.duration, connections=opts.connections,
                threads=opts.threads,
            )  # fmt: skip
            cpu = cpu_seconds(target.child.pid) - cpu_before
            main = main_thread_cpu_seconds(target.child.pid) - main_before
            runs[target.name].append(result)
            cpu_ms[target.name].append(cpu * 1000 / result.requests if result.requests else 0.0)
            main_ms[target.name].append(main * 1000 / result.requests if result.requests else 0.0)
            alone = await run_wrk(
                target.url + path, duration=opts.latency_duration, connections=1, threads=1
            )
            single[target.name].append(alone)
            errors = result.errors + alone.errors
            ctx.log(
                f"  round {round_no + 1} {target.name:16} {result.rps:9,.0f} req/s"
                f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                f"  CPU {cpu_ms[target.name][-1]:5.2f} ms/req"
                f" (main thread {main_ms[target.name][-1]:5.2f})"
                f"  | 1 conn: p50 {alone.p50_ms:5.2f} ms p99 {alone.p99_ms:5.2f} ms"
                + (f"  ERRORS {errors}" if errors else "")
            )

    def ratio_to(other: str, of: str = "service") -> float | None:
        if other not in runs or of not in runs:
            return None
        return median([a.rps / b.rps for a, b in zip(runs[of], runs[other], strict=True)])

    p50_over_pass = (
        median(
            [
                a.p50_ms - b.p50_ms
                for a, b in zip(single["service"], single["passthrough"], strict=True)
            ]
        )
        if "passthrough" in single
        else None
    )
    section = Section(
        "warm",
        f"1. Warm cache: page of {opts.page_size} contacts, every id cached",
        [
            "target",
            "req/s (median)",
            "req/s per round",
            "p50 ms",
            "p99 ms",
            "p50 / p99 ms, 1 conn",
            "CPU ms/req: process / main thread",
            "vs Node",
            "vs service",
            "errors",
        ],
    )
    summary: dict[str, Any] = {}
    for target in targets:
        results = runs[target.name]
        rps = median([r.rps for r in results])
        vs_node = ratio_to("node", of=target.name) if target.name != "node" else 1.0
        vs_service = ratio_to("service", of=target.name)
        summary[target.name] = {
            "label": target.label,
            "rps": rps,
            "p50_ms": median([r.p50_ms for r in results]),
            "p99_ms": median([r.p99_ms for r in results]),
            "errors": sum(r.errors for r in results) + sum(r.errors for r in single[target.name]),
            "single_p50_ms": median([r.p50_ms for r in single[target.name]]),
            "single_p99_ms": median([r.p99_ms for r in single[target.name]]),
            "single_rounds": [r.as_dict() for r in single[target.name]],
            "cpu_ms_per_request": median(cpu_ms[target.name]),
            "cpu_ms_per_request_rounds": cpu_ms[target.name],
            "main_thread_cpu_ms_per_request": median(main_ms[target.name]),
            "vs_node": vs_node,
            "vs_service": vs_service,
            "rounds": [r.as_dict() for r in results],
        }
        section.rows.append(
            [
                target.label,
                fmt(rps, 0),
                " / ".join(fmt(r.rps, 0) for r in results),
                fmt(summary[target.name]["p50_ms"], 2),
                fmt(summary[target.name]["p99_ms"], 2),
                f"{summary[target.name]['single_p50_ms']:.2f} /"
                f" {summary[target.name]['single_p99_ms']:.2f}",
                f"{summary[target.name]['cpu_ms_per_request']:.2f} /"
                f" {summary[target.name]['main_thread_cpu_ms_per_request']:.2f}",
                "—" if vs_node is None else f"{vs_node:.2f}×",
                "—" if vs_service is None else f"{vs_service:.2f}×",
                str(summary[target.name]["errors"]),
            ]
        )
    cpu_vs_node = main_vs_node = None
    if "node" in cpu_ms:
        cpu_vs_node = median(
            [n / s for s, n in zip(cpu_ms["service"], cpu_ms["node"], strict=True) if s > 0]
        )
        main_vs_node = median(
            [n / s for s, n in zip(main_ms["service"], main_ms["node"], strict=True) if s > 0]
        )
    section.data = {
        "path": path,
        "targets": summary,
        "service_vs_node": ratio_to("node"),
        "node_cpu_per_request_over_service": cpu_vs_node,
        "node_main_thread_cpu_per_request_over_service": main_vs_node,
        "service_vs_passthrough": ratio_to("passthrough"),
        "service_p50_minus_passthrough_ms": p50_over_pass,
        "bodies_equal_service_node": same,
        "bodies_equal_service_noredis": same_noredis,
        "wrk": {
            "duration_s": opts.duration,
            "rounds": opts.rounds,
            "connections": opts.connections,
            "threads": opts.threads,
        },
    }
    section.notes.append(
        f"`GET {path}` (a page whose every customer and user exists, sim with"
        f" {WARM_USERS} users, 0 ms upstream latency); wrk -t{opts.threads}"
        f" -c{opts.connections}, {opts.rounds} rounds × {opts.duration:g} s per target,"
        f' in turn; "vs Node" and "vs service" are medians of the per-round ratios of'
        ' req/s. "CPU ms/req" is the CPU time (from /proc) of the target process (all its'
        " threads) and of its main thread (the event loop, which bounds req/s) per request"
        " served: the machine's noise moves it much less than req/s."
    )
    if cpu_vs_node is not None and main_vs_node is not None:
        section.notes.append(
            f"CPU per request, Node.js / service: {cpu_vs_node:.2f}× for the process,"
            f" {main_vs_node:.2f}× for the main thread (medians of rounds)."
        )
    section.notes.append(
        f"One connection (wrk -c1, {opts.latency_duration:g} s per target and round)"
        + (
            ""
            if p50_over_pass is None
            else f": service p50 minus pass-through p50 {p50_over_pass:+.2f} ms (median of rounds)."
        )
        + ("" if same else " WARNING: the service's and Node's bodies differ.")
    )
    return section


# -- 2. cold cache ---------------------------------------------------------------------------


async def cold(ctx: Context) -> Section:
    opts, sim = ctx.options, ctx.stack.sim
    sim.configure(
        latency_ms={"contacts": opts.contacts_ms, "customers": opts.crm_ms, "users": opts.crm_ms},
        users=DEFAULT_USERS,
        customers=DEFAULT_CUSTOMERS,
    )
    names = ctx.names("service", *(v.name for v in opts.variants), "node", "passthrough")
    targets = [ctx.target(n) for n in names]
    run_id = uuid.uuid4().hex[:6]
    direct = "upstream"
    times: dict[str, list[float]] = {name: [] for name in [*names, direct]}
    crm_calls: dict[str, list[int]] = {name: [] for name in [*names, direct]}
    partial = 0
    async with session() as http:
        for sample in range(-1, opts.cold_samples):  # sample -1 warms connections, not counted
            seconds, batches = await _direct_cold(
                http, sim.url, f"cold-{run_id}-{direct}-{sample + 1}", opts.cold_page_size
            )
            if sample >= 0:
                times[direct].append(_ms(seconds))
                crm_calls[direct].append(batches)
            await settle(0.05)
            for target in targets:
                instance = f"cold-{run_id}-{target.name}-{sample + 1}"
                before = sim.stats()["calls"]
                reply = await timed_get(
                    http, target.url + contacts_path(instance, opts.cold_page_size)
                )
                after = sim.stats()["calls"]
                if reply.status != 200:
                    raise RuntimeError(f"{target.name}: cold page answered {reply.status}")
                if target.name.startswith("service") and (
                    reply.headers.get("x-enrichment") != "complete"
                ):
                    partial += 1
                if sample >= 0:
                    times[target.name].append(_ms(reply.seconds))
                    crm_calls[target.name].append(
                        after["customers"] + after["users"] - before["customers"] - before["users"]
                    )
                await settle(0.05)
    nominal = opts.contacts_ms + opts.crm_ms
    measured = median(times[direct])
    section = Section(
        "cold",
        f"2. Cold cache: page of {opts.cold_page_size} contacts, CRM {opts.crm_ms:g} ms,"
        f" contacts {opts.contacts_ms:g} ms",
        [
            "target",
            "p50 ms",
            "p90 ms",
            "max ms",
            "CRM calls/req",
            f"p50 − {nominal:g} ms (contacts + CRM)",
            "p50 − upstream called directly",
        ],
    )
    labels = {t.name: t.label for t in targets} | {
        direct: "upstream called directly: contacts, then all CRM batches at once"
    }
    summary: dict[str, Any] = {}
    for name in [direct, *(t.name for t in targets)]:
        values = times[name]
        p50 = median(values)
        is_pass = name == "passthrough"
        summary[name] = {
            "label": labels[name],
            "p50_ms": p50,
            "p90_ms": percentile(values, 90),
            "max_ms": max(values, default=0.0),
            "samples_ms": values,
            "crm_calls_per_request": median([float(c) for c in crm_calls[name]]),
            "minus_nominal_ms": p50 - (opts.contacts_ms if is_pass else nominal),
            "minus_direct_ms": None if is_pass or name == direct else p50 - measured,
        }
        row = summary[name]
        section.rows.append(
            [
                labels[name],
                fmt(p50, 1),
                fmt(row["p90_ms"], 1),
                fmt(row["max_ms"], 1),
                fmt(row["crm_calls_per_request"], 0),
                f"{row['minus_nominal_ms']:+.1f} ms" + (" (vs contacts only)" if is_pass else ""),
                "—" if row["minus_direct_ms"] is None else f"{row['minus_direct_ms']:+.1f} ms",
            ]
        )
    service_p50 = summary["service"]["p50_ms"]
    section.data = {
        "targets": summary,
        "expected_ms": nominal,
        "upstream_direct_ms": measured,
        "contacts_ms": opts.contacts_ms,
        "crm_ms": opts.crm_ms,
        "service_overhead_ms": service_p50 - nominal,
        "service_overhead_vs_direct_ms": service_p50 - measured,
        "partial_responses": partial,
        "paired_vs_service": _paired(times, [v.name for v in opts.variants]),
    }
    for name, paired in section.data["paired_vs_service"].items():
        section.notes.append(
            f"Paired (request n of each, sent back to back): {name} − service, median"
            f" {paired['median_ms']:+.2f} ms, mean {paired['mean_ms']:+.2f} ms over"
            f" {paired['pairs']} pairs."
        )
    section.notes.append(
        f"{opts.cold_samples} sequential requests per target, in turn, each for a new instance"
        f" (nothing cached). Nominal: contacts {opts.contacts_ms:g} ms + one CRM round"
        f" {opts.crm_ms:g} ms = {nominal:g} ms, whatever the number of batches. The simulator"
        " is one Python process: it renders a new page and each CRM batch one after the other,"
        " so the first row measures what the upstream itself takes for the same work (the"
        " benchmark fetching the page, then all its CRM batches concurrently), the floor for"
        " any service."
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


async def _direct_cold(
    http: aiohttp.ClientSession, sim_url: str, instance: str, per_page: int
) -> tuple[float, int]:
    """The contacts call and then every CRM batch of its ids in parallel, straight to the sim."""
    started = time.perf_counter()
    reply = await timed_get(http, f"{sim_url}/{instance}/contacts?per_page={per_page}&page=1")
    items = orjson.loads(reply.body)["data"]
    wanted = {
        "customers": list(
            dict.fromkeys(str(c["customerId"]) for c in items if c["customerId"] is not None)
        ),
        "users": list(dict.fromkeys(str(c["userId"]) for c in items if c["userId"] is not None)),
    }
    urls = [
        f"{sim_url}/{instance}/{api}?ids={','.join(ids[i : i + 100])}"
        for api, ids in wanted.items()
        for i in range(0, len(ids), 100)
    ]
    await asyncio.gather(*(timed_get(http, url) for url in urls))
    return time.perf_counter() - started, len(urls)


# -- 3. counted Redis round trips and CRM calls ----------------------------------------------


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
                ours = {k: v for k, v in commands.items() if k not in _ADMIN_COMMANDS}
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


# -- 4. memory -------------------------------------------------------------------------------


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


# -- 5. start-up -----------------------------------------------------------------------------


async def startup(ctx: Context) -> Section:
    opts, stack = ctx.options, ctx.stack
    kinds: list[tuple[str, Callable[[str], Target]]] = [
        ("service", lambda n: stack.start_service(n, db=4, wait=False)),
    ]
    if not opts.skip_node:
        kinds.append(("node", lambda n: stack.start_node(n, db=5, wait=False)))
    times: dict[str, list[float]] = {k: [] for k, _ in kinds}
    labels: dict[str, str] = {}
    for run in range(opts.startup_runs):
        for kind, start in kinds:
            target = start(f"{kind}-startup-{run}")
            labels[kind] = target.label
            try:
                seconds = await asyncio.to_thread(target.child.wait_http, "/health", 30.0, 0.002)
            finally:
                stack.children.stop(target.child)
            times[kind].append(seconds)
    section = Section(
        "startup",
        "5. Start-up: process start to `/health` 200",
        ["target", "median s", "min s", "max s", "runs"],
    )
    for kind, values in times.items():
        section.rows.append(
            [
                labels[kind],
                fmt(median(values), 3),
                fmt(min(values), 3),
                fmt(max(values), 3),
                str(len(values)),
            ]
        )
    section.data = {
        k: {"label": labels[k], "median_s": median(v), "runs_s": v} for k, v in times.items()
    }
    section.notes.append(
        "Wall clock from `Popen` to the first 200 of `GET /health`, polled every 2 ms, in turn."
    )
    return section


# -- 6. stampede -----------------------------------------------------------------------------


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
            wall = _ms(time.perf_counter() - started)
            await settle(0.3)
            stats = sim.stats()
            fetched = sum(stats["ids_requested"].values())
            unique = sum(stats["unique_ids_requested"].values())
            latencies = [_ms(r.seconds) for r in replies]
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


# -- 7. overload ----------------------------------------------------------------------------


#: what the overload scenario reads from each service's /metrics around a run
_OVERLOAD_COUNTERS = (
    "redis_errors_total",
    "cache_misses_total",
    "crm_ids_fetched_total",
    "admission_shed_total",
)


async def overload(ctx: Context) -> Section:
    """The warm page at several times the warm scenario's load, with and without the
    admission limit (MAX_ACTIVE_REQUESTS): what saturation does to Redis reads."""
    opts = ctx.options
    path = warm_page(ctx)
    names = ["service", "service-unlimited", *(v.name for v in opts.variants)]
    targets = [ctx.target(n) for n in names]
    async with session() as http:
        for target in targets:
            for _ in range(2):  # the first fills the cache if no scenario did
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
        f"7. Overload: the warm page at {conns} connections",
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
        row = {
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
        " cached page of the warm scenario; counters from each service's /metrics. `service`"
        " runs with the default MAX_ACTIVE_REQUESTS; the other with no effective limit"
        f" ({UNLIMITED:,}). Throughput, service / no limit: {ratio:.2f}× (median of"
        " per-round ratios). Shed: requests refused with 503 after"
        " ADMISSION_QUEUE_TIMEOUT_SECONDS (admission_shed_total); goodput: req/s less those."
        " wrk's latencies include the shed replies."
    )
    return section


SCENARIOS: dict[str, Callable[[Context], Awaitable[Section]]] = {
    "warm": warm,
    "cold": cold,
    "counts": counts,
    "memory": memory,
    "startup": startup,
    "stampede": stampede,
    "overload": overload,
}
