"""Start-up: from `Popen` to the first `GET /health` 200, several times each.

The service is started twice over: from the development environment, and installed as
the Docker image installs it (bench.runtime), which is what a replica starts from, with
`--image-python` (the image's interpreter) or else the benchmark's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bench.load import median
from bench.runtime import RuntimeUnavailable
from bench.scenarios.common import Context, Section, fmt
from bench.stack import Target


async def startup(ctx: Context) -> Section:
    opts, stack = ctx.options, ctx.stack
    kinds: list[tuple[str, Callable[[str], Target]]] = [
        ("service", lambda n: stack.start_service(n, db=4, wait=False)),
    ]
    if not opts.skip_node:
        kinds.append(("node", lambda n: stack.start_node(n, db=5, wait=False)))
    left_out = None
    try:
        installed, built_with = await asyncio.to_thread(ctx.installed)
    except RuntimeUnavailable as exc:
        left_out = f"The image install was not measured: {exc}"
    else:
        label = f"service, image install ({built_with})"
        kinds.insert(
            1,
            (
                "service-image",
                lambda n: stack.start_service(
                    n, db=4, wait=False, installed=installed, label=label
                ),
            ),
        )
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
        " `service` runs from the development environment; the image install has the"
        " runtime dependencies only, with compiled bytecode, as the Docker image does."
    )
    if left_out:
        section.notes.append(left_out)
    return section
