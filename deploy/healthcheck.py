#!/usr/bin/env python3
"""The image's HEALTHCHECK: probe whichever server this container runs.

One image runs two roles: the service (`python -m app`, `GET /health` on
$PORT, default 8000) and the simulated upstream (`python -m simupstream`,
`GET /healthz` on its --port, $SIM_PORT or 8081). The role is read from the
command line of PID 1 (the entrypoint execs the command), so `docker run` of
either role is healthy without any option. Exit 0 when the probe answers 2xx.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence


def probe_url(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The URL that tells whether the server started by `argv` is healthy."""
    if "simupstream" in argv:
        port = env.get("SIM_PORT") or "8081"
        for i, arg in enumerate(argv):
            if arg == "--port" and i + 1 < len(argv):
                port = argv[i + 1]
            elif arg.startswith("--port="):
                port = arg.partition("=")[2]
        return f"http://127.0.0.1:{port}/healthz"
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return f"http://127.0.0.1:{argv[i + 1]}/health"
    return f"http://127.0.0.1:{env.get('PORT') or '8000'}/health"


def pid1_argv() -> list[str]:
    with open("/proc/1/cmdline", "rb") as cmdline:
        return [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]


def main() -> int:
    url = probe_url(pid1_argv(), os.environ)
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - a loopback URL built above
            return 0
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
