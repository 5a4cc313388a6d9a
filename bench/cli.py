"""Command line of `python -m bench`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import profiles, report
from bench.load import wrk_available
from bench.procs import Children
from bench.runtime import RuntimeUnavailable, find_uv
from bench.scenarios import SCENARIOS, Context, Options, Section, Variant
from bench.scenarios.common import IMAGE
from bench.stack import NODE_SOURCE, REPO, NodeUnavailable, prepare_node, start_stack

DEFAULT_OUT = REPO / "bench" / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service against the Node.js original design, on loopback.",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, in order (default: all: {','.join(SCENARIOS)})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny durations (smoke test)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per target (default 6)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk warm-up per target")
    parser.add_argument(
        "--profiles",
        help="page profiles of the warm scenario, in order (default: all:"
        f" {','.join(profiles.PROFILES)})",
    )
    parser.add_argument(
        "--cold-profile",
        choices=list(profiles.PROFILES),
        help="the page of the cold scenario (default: big, 1,000 contacts)",
    )
    parser.add_argument(
        "--connections", type=int, help="wrk connections, every profile (default: each its own)"
    )
    parser.add_argument("--threads", type=int, help="wrk threads (default 1)")
    parser.add_argument(
        "--overload-connections", type=int, help="wrk connections of the overload scenario (256)"
    )
    parser.add_argument(
        "--cold-samples", type=int, help="cold requests per target (default 15), for A/B runs"
    )
    parser.add_argument("--skip-node", action="store_true", help="without the Node.js reference")
    parser.add_argument("--node-src", type=Path, default=NODE_SOURCE, help="the Node.js reference")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR[,VAR=VALUE...]",
        help="also run the service from DIR (a folder with an `app` package, e.g. a git"
        " worktree), with these environment variables, in the warm, cold, stampede and"
        " overload scenarios, for A/B comparisons; repeatable",
    )
    parser.add_argument(
        "--image-python",
        metavar="PYTHON",
        help="the interpreter the Docker image runs, or the closest this machine has (the"
        " official python:3.11-slim builds CPython with PGO and LTO): the service is"
        " installed with it as the image installs it and measured as target `image` in the"
        " warm, cold, stampede and overload scenarios, and in start-up (default: start-up"
        " only, with this interpreter)",
    )
    parser.add_argument(
        "--warm-targets",
        help="comma-separated subset of the warm scenario's targets (service, node,"
        " passthrough, variant names); default: all",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--scenario-timeout", type=float, default=900.0, help="seconds allowed per scenario"
    )
    return parser


def options_from(args: argparse.Namespace) -> Options:
    overrides = {
        name: value
        for name, value in (
            ("duration", args.duration),
            ("rounds", args.rounds),
            ("warmup", args.warmup),
            ("connections", args.connections),
            ("threads", args.threads),
            ("cold_samples", args.cold_samples),
            ("overload_connections", args.overload_connections),
            ("cold_profile", args.cold_profile),
        )
        if value is not None
    }
    overrides["skip_node"] = args.skip_node
    if args.profiles is not None:
        try:
            overrides["profiles"] = profiles.parse(args.profiles)
        except ValueError as exc:
            raise SystemExit(f"--profiles: {exc}") from None
    variants: list[Variant] = []
    for spec in args.variant:
        head, *assignments = spec.split(",")
        name, _, folder = head.partition("=")
        if name == IMAGE:
            raise SystemExit(f"--variant {spec!r}: the name {IMAGE!r} is --image-python's")
        env = dict(a.partition("=")[::2] for a in assignments)
        if not name or not folder or not (Path(folder) / "app").is_dir() or "" in env:
            raise SystemExit(
                f"--variant {spec!r}: expected NAME=DIR[,VAR=VALUE...], DIR holding an app/"
            )
        variants.append(Variant(name, folder, tuple(env.items())))
    if args.image_python:
        python = shutil.which(args.image_python)
        if python is None:
            raise SystemExit(f"--image-python {args.image_python!r}: no such interpreter")
        try:
            find_uv()
        except RuntimeUnavailable as exc:
            raise SystemExit(f"--image-python: {exc}") from None
        overrides["image_python"] = str(Path(python).absolute())
        variants.append(Variant(IMAGE, str(REPO), image=True))
    overrides["variants"] = tuple(variants)
    if args.warm_targets:
        overrides["warm_targets"] = tuple(t.strip() for t in args.warm_targets.split(","))
    if args.quick:
        return Options.quick(**overrides)
    return Options(**overrides)


def _needs_image_install(wanted: Sequence[str], options: Options) -> bool:
    """Start-up always measures the image install; the other scenarios with `--image-python`."""
    return "startup" in wanted or options.image_python is not None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios: {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    if "warm" in wanted and not wrk_available():
        print("wrk is not installed: scripts/ensure-system-deps.sh bench", file=sys.stderr)
        return 2
    options = options_from(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    children = Children(out / "logs")
    children.install_handlers()
    machine = report.machine_info()
    sections: dict[str, Section] = {}
    errors: dict[str, str] = {}
    node_note: str | None = None
    try:
        node_dir = None
        if not options.skip_node:
            log(f"preparing the Node.js reference from {args.node_src}")
            try:
                node_dir = prepare_node(args.node_src)
            except NodeUnavailable as exc:
                log(f"the Node.js reference is left out, measuring the rest: {exc}")
                options = dataclasses.replace(options, skip_node=True)
                node_note = "The Node.js reference was not measured: " + " ".join(str(exc).split())
        stack = start_stack(children, node_dir=node_dir)
        ctx = Context(stack, options, log, workdir=out)
        if _needs_image_install(wanted, options):
            # Built before the scenarios, on no scenario's clock and outside any event loop
            # (uv sync takes seconds); a failure fails only the scenarios that need it.
            started = time.monotonic()
            try:
                ctx.installed()
                log(f"image install built in {time.monotonic() - started:.1f} s")
            except RuntimeUnavailable as exc:
                log(f"the image install could not be built: {exc}")
        for name in wanted:
            log(f"scenario {name}")
            started = time.monotonic()
            try:
                sections[name] = asyncio.run(
                    asyncio.wait_for(SCENARIOS[name](ctx), args.scenario_timeout)
                )
            except Exception as exc:  # report the others; the exit status tells
                errors[name] = "".join(traceback.format_exception(exc))
                log(f"scenario {name} FAILED:\n{errors[name]}")
            log(f"scenario {name} took {time.monotonic() - started:.1f} s")
    except KeyboardInterrupt:
        children.stop_all()
        log("interrupted: every child process was stopped")
        return 130
    finally:
        children.stop_all()

    text = report.markdown(sections, machine, command)
    if node_note:
        text += f"\n## Left out\n\n- {node_note}\n"
    if errors:
        text += "\n## Failed scenarios\n\n" + "\n".join(f"- {k}" for k in errors) + "\n"
    (out / "bench.md").write_text(text)
    report.write_json(
        out / "bench.json",
        sections,
        machine,
        {
            "argv": command,
            "options": dataclasses.asdict(options),
            "errors": errors,
            "node_left_out": node_note,
        },
    )
    chart = report.write_chart(out, sections)
    print(text)
    log(f"written: {out / 'bench.md'}, {out / 'bench.json'}" + (f", {chart}" if chart else ""))
    return 1 if errors else 0
