"""The results: a markdown report (printed and written), a JSON file and a chart."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.scenarios import Section
from bench.scenarios.common import IMAGE

REPO = Path(__file__).resolve().parent.parent


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0

    def version(*args: str) -> str:
        if shutil.which(args[0]) is None:
            return "not installed"
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "unknown"

    def git(*args: str) -> str | None:
        """Git's standard output (empty when it has nothing to say), None when git failed."""
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO), *args],
                capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": cpus,
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": version("node", "--version"),
        "redis": version("redis-server", "--version"),
        "wrk": version("wrk", "--version"),
        "loadavg_start": os.getloadavg(),
        "git_commit": git("rev-parse", "--short", "HEAD") or "unknown",
        # None: not a git checkout (or no git), so nothing is claimed either way
        "git_dirty": None if status is None else status != "",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary_rows(sections: dict[str, Section]) -> list[list[str]]:
    """The issue's targets, each with what this run measured."""
    rows: list[list[str]] = []

    def add(check: str, measured: str, target: str, met: bool | None) -> None:
        verdict = "—" if met is None else ("yes" if met else "**no**")
        rows.append([check, measured, target, verdict])

    if "warm" in sections:
        for name, d in sections["warm"].data["profiles"].items():
            size = f"{d['enriched_bytes'] / 1000:,.0f} KB"
            # The service from the development environment, and (with --image-python) as
            # the image installs and runs it, each against Node.js in the same rounds.
            for target, who in (("service", "service"), (IMAGE, "image install")):
                if target not in d["targets"]:
                    continue
                svc = d["targets"][target]
                ratio = svc["node_cpu_over_this"]
                label = f"warm CPU per request, Node.js / {who}: {name} ({size})"
                if ratio is None:
                    add(label, f"{who} {svc['cpu_ms_per_request']:.3f} ms", "≥ 1.2×", None)
                    continue
                node = d["targets"]["node"]
                add(
                    label,
                    f"{ratio:.2f}× ({node['cpu_ms_per_request']:.3f} vs"
                    f" {svc['cpu_ms_per_request']:.3f} ms; {svc['rps']:,.0f} vs"
                    f" {node['rps']:,.0f} req/s)",
                    "≥ 1.2×",
                    ratio >= 1.2,
                )
    if "counts" in sections:
        for row in sections["counts"].data["rows"]:
            if row["name"] == "service" and row["case"].startswith("warm, every"):
                trips = row["service_round_trips"]
                measured = (
                    f"{trips:g} round trip(s), {row['redis_reads']:g} socket read(s),"
                    f" {row['crm_calls']:g} CRM calls"
                )
                add(
                    "warm request: Redis round trips, CRM calls",
                    measured,
                    "1 and 0",
                    trips == 1 and row["crm_calls"] == 0,
                )
    if "cold" in sections:
        d = sections["cold"].data
        image = d["targets"].get(IMAGE)
        ratio = d["service_overhead_over_node"]
        over = f"{d['service_overhead_ms']:+.1f} ms"
        if d["node_overhead_ms"] is not None:
            over += f" vs Node {d['node_overhead_ms']:+.1f} ms"
        add(
            f"cold page of {d['contacts']:,}: overhead over the upstream called directly,"
            " service / Node.js",
            ("" if ratio is None else f"{ratio:.2f}× (")
            + over
            + f" over {d['upstream_direct_ms']:.1f} ms"
            + ("" if ratio is None else ")"),
            "≤ 0.5×",
            None if ratio is None else ratio <= 0.5,
        )
        if image is not None:
            ratio = image["overhead_over_node"]
            add(
                f"cold page of {d['contacts']:,}: overhead, image install / Node.js",
                ("" if ratio is None else f"{ratio:.2f}× (")
                + f"{image['overhead_ms']:+.1f} ms"
                + ("" if ratio is None else ")"),
                "≤ 0.5×",
                None if ratio is None else ratio <= 0.5,
            )
    if "memory" in sections:
        m = sections["memory"].data["targets"]["service"]
        growth = m["rss_growth_kib"] / 1024
        add(
            f"RSS growth after {m['distinct_customers']:,} customers",
            f"{growth:+.1f} MiB",
            "< 10 MiB",
            growth < 10,
        )
        add(
            "Redis memory per 100k cached customers",
            f"{m['redis_bytes_per_100k_customers'] / 2**20:.1f} MiB",
            "(reported)",
            None,
        )
    if "startup" in sections:
        startup = sections["startup"].data
        # The bound is for a replica, which starts from the image's install; the
        # development environment (test tools installed too) is reported beside it.
        if "service-image" in startup:
            s = startup["service-image"]["median_s"]
            add("start-up to /health 200, image install", f"{s:.3f} s", "< 1 s", s < 1.0)
        s = startup["service"]["median_s"]
        add(
            "start-up to /health 200, development environment",
            f"{s:.3f} s",
            "(reported)" if "service-image" in startup else "< 1 s",
            None if "service-image" in startup else s < 1.0,
        )
    if "stampede" in sections:
        st = sections["stampede"].data["targets"]["service"]
        add(
            "stampede: CRM fetches per unique id",
            f"{st['fetches_per_unique_id']:.2f} (max {st['max_fetches_per_id']})",
            "1",
            st["max_fetches_per_id"] == 1,
        )
    if "overload" in sections:
        d = sections["overload"].data
        svc, free = d["targets"]["service"], d["targets"]["service-unlimited"]
        add(
            f"overload (wrk -c{d['connections']}): throughput, Redis errors;"
            " service / without the admission limit",
            f"{d['service_vs_unlimited']:.2f}× ({svc['rps']:,.0f} vs {free['rps']:,.0f} req/s),"
            f" {svc['redis_errors']:g} vs {free['redis_errors']:g}",
            "(reported)",
            None,
        )
    return rows


def table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(sections: dict[str, Section], machine: dict[str, Any], command: str) -> str:
    parts = [
        "# Benchmark results",
        "",
        f"{machine['date']} · `{command}` · commit {machine['git_commit']}"
        + (" (with uncommitted changes)" if machine["git_dirty"] else ""),
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB,"
        f" Linux {machine['kernel']}, Python {machine['python']}, Node {machine['node']},"
        f" {machine['redis'].split(' sha=')[0]}, {machine['wrk'].split(' [')[0]};"
        f" load average at start {', '.join(f'{x:.2f}' for x in machine['loadavg_start'])}."
        " Everything (load generator included) shares these CPUs.",
        "",
    ]
    summary = summary_rows(sections)
    if summary:
        parts += ["## Summary", "", table(["check", "measured", "target", "met"], summary), ""]
    for section in sections.values():
        parts += [f"## {section.title}", "", table(section.columns, section.rows), ""]
        parts += [*section.notes, ""] if section.notes else []
    return "\n".join(parts).rstrip() + "\n"


def write_json(
    path: Path, sections: dict[str, Section], machine: dict[str, Any], args: Any
) -> None:
    payload = {
        "machine": machine,
        "args": args,
        "summary": summary_rows(sections),
        "scenarios": {
            key: {"title": s.title, "columns": s.columns, "rows": s.rows, "data": s.data}
            for key, s in sections.items()
        },
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_chart(out_dir: Path, sections: dict[str, Section]) -> Path | None:
    """A PNG with matplotlib (the `bench` extra); without it, a hand-written SVG."""
    bars = _chart_data(sections)
    if not bars:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = out_dir / "bench.svg"
        path.write_text(_svg(bars))
        return path
    fig, axes = plt.subplots(1, len(bars), figsize=(5.2 * len(bars), 4.2), squeeze=False)
    # first match wins: the specific labels before plain "service"
    colors = {"USE_REDIS": "#1971c2", "pass": "#868e96", "Node.js": "#e8590c", "service": "#2b8a3e"}
    for ax, (title, unit, items) in zip(axes[0], bars, strict=True):
        labels = [label for label, _ in items]
        values = [value for _, value in items]
        palette = [
            next((c for k, c in colors.items() if k in label), "#495057") for label in labels
        ]
        ax.bar(range(len(values)), values, color=palette)
        ax.set_xticks(range(len(values)), [label.replace(" ", "\n", 1) for label in labels])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        for i, value in enumerate(values):
            ax.annotate(_short(value), (i, value),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.tight_layout()
    path = out_dir / "bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _chart_data(sections: dict[str, Section]) -> list[tuple[str, str, list[tuple[str, float]]]]:
    out: list[tuple[str, str, list[tuple[str, float]]]] = []
    if "warm" in sections:
        for name, d in sections["warm"].data["profiles"].items():
            out.append(
                (
                    f"Warm {name}: CPU per request",
                    "ms",
                    [(v["label"], v["cpu_ms_per_request"]) for v in d["targets"].values()],
                )
            )
    if "cold" in sections:
        t = sections["cold"].data["targets"]
        items = [(v["label"].split(":")[0], v["p50_ms"]) for v in t.values()]
        out.append(("Cold: p50 latency", "ms", items))
    if "stampede" in sections:
        t = sections["stampede"].data["targets"]
        out.append(
            (
                "Stampede: CRM fetches per unique id",
                "fetches",
                [(v["label"], v["fetches_per_unique_id"]) for v in t.values()],
            )
        )
    return out


def _svg(bars: list[tuple[str, str, list[tuple[str, float]]]]) -> str:
    width, height, pad = 320, 260, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(bars)}" height="{height}"'
        ' font-family="sans-serif" font-size="10">'
    ]
    for n, (title, unit, items) in enumerate(bars):
        x0 = n * width
        top = max((v for _, v in items), default=1.0) or 1.0
        parts.append(f'<text x="{x0 + 10}" y="15" font-size="12">{title} ({unit})</text>')
        slot = (width - pad) / max(1, len(items))
        for i, (label, value) in enumerate(items):
            h = (height - 2 * pad - 20) * value / top
            x = x0 + pad / 2 + i * slot + slot * 0.15
            y = height - pad - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}"'
                ' fill="#2b8a3e"/>'
            )
            parts.append(f'<text x="{x:.1f}" y="{y - 3:.1f}">{_short(value)}</text>')
            parts.append(f'<text x="{x:.1f}" y="{height - pad + 12}">{label[:18]}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _short(value: float) -> str:
    if value < 10:
        return f"{value:.2f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
