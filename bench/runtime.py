"""The service installed as the Docker image installs it, for the start-up scenario and
the `image` target (`--image-python`).

The development environment holds the test tools too, and some are imported by the
service's own libraries when present (structlog renders tracebacks with `rich` if it
is installed: ~80 ms of start-up here). The image has none of them. This builds the
image's install the way its Dockerfile does: the files it copies (pyproject.toml,
uv.lock, README.md, app/, simupstream/) in a clean folder of their own, then `uv sync
--locked --no-dev --no-editable` with compiled bytecode, in a few seconds. A clean
folder, not the checkout: setuptools would otherwise package whatever its `build/`
still holds from an earlier build, modules since deleted included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.stack import REPO

PROJECT = "enriched-contacts"
#: what the Dockerfile copies into its build stage
SOURCES = ("pyproject.toml", "uv.lock", "README.md", "app", "simupstream")


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


def runtime_python(python: str, target: Path) -> str:
    """Install this checkout's service and its runtime dependencies only, from uv.lock,
    with the interpreter `python`, into the new folder `target`; the install's
    interpreter."""
    uv = find_uv()
    if target.exists():
        raise RuntimeUnavailable(f"{target} exists: an install is built into a new folder")
    with tempfile.TemporaryDirectory(prefix="bench-image-src-") as scratch:
        source = Path(scratch)
        for name in SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, source / name)
        env = {
            **os.environ,
            "UV_PROJECT_ENVIRONMENT": str(target),
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_COMPILE_BYTECODE": "1",
            "UV_LINK_MODE": "copy",
        }
        env.pop("VIRTUAL_ENV", None)
        # --reinstall-package: uv would otherwise reuse a wheel it built of an earlier
        # checkout of the same version.
        args = [
            uv, "sync", "--locked", "--no-dev", "--no-editable", "--python", python,
            "--reinstall-package", PROJECT, "-q",
        ]  # fmt: skip
        done = subprocess.run(
            args, cwd=source, env=env, capture_output=True, text=True, timeout=600
        )
    if done.returncode != 0:
        raise RuntimeUnavailable(f"uv sync failed: {done.stderr.strip()[-500:]}")
    installed = target / "bin" / "python"
    if not installed.exists():
        raise RuntimeUnavailable(f"uv sync left no interpreter at {installed}")
    return str(installed)
