"""The service installed as the Docker image installs it, for the start-up scenario.

The development environment holds the test tools too, and some are imported by the
service's own libraries when present (structlog renders tracebacks with `rich` if it
is installed: ~80 ms of start-up here). The image has none of them: `uv sync --locked
--no-dev --no-editable` with compiled bytecode (Dockerfile). This builds the same
install from this checkout into `build/bench-runtime`, in about two seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME_ENV = REPO / "build" / "bench-runtime"
PROJECT = "enriched-contacts"


class RuntimeUnavailable(RuntimeError):
    """The runtime install could not be built (no uv, or uv failed)."""


def find_uv() -> str:
    """The Makefile's pinned uv (`.uv/`), else one on PATH."""
    pinned = REPO / ".uv" / "bin" / "uv"
    if pinned.exists():
        return str(pinned)
    found = shutil.which("uv")
    if found is None:
        raise RuntimeUnavailable("uv is not installed (`make install` installs it into .uv/)")
    return found


def runtime_python(python: str = sys.executable, target: Path = RUNTIME_ENV) -> str:
    """Install the service and its runtime dependencies only, from uv.lock, with the
    interpreter `python` into `target` (again each time: the checkout may have changed)
    and return the install's interpreter."""
    uv = find_uv()
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(target),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_COMPILE_BYTECODE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    if target.exists():  # another interpreter's install is not updated in place
        shutil.rmtree(target)
    # The project is rebuilt every time: uv would keep an installed version as it is,
    # whatever the checkout now holds.
    args = [
        uv, "sync", "--locked", "--no-dev", "--no-editable", "--python", python,
        "--reinstall-package", PROJECT, "-q",
    ]  # fmt: skip
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeUnavailable(f"uv sync failed: {done.stderr.strip()[-500:]}")
    python = target / "bin" / "python"
    if not python.exists():
        raise RuntimeUnavailable(f"uv sync left no interpreter at {python}")
    return str(python)
