"""`python -m app`: serve the service with its hardened uvicorn configuration (app.server).

The Docker image's command and `make run` both start the service this way, so
they share every server bound. PORT and WEB_CONCURRENCY are read from the
environment when the options are not given.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence

# Off while the service imports (app.main.tune_gc turns it back on, tuned, once the
# app is built): the imports create ~130,000 long-lived objects and little garbage.
# Only when run as a program, never in a process that imports this module. (The
# workers of --workers N are spawned processes that do not run this module: they
# import with the collector on, and tune it as they build the app.)
if __name__ == "__main__":
    gc.disable()

from app.server import ServeOptions, env_int, serve


def parse_args(argv: Sequence[str] | None = None) -> ServeOptions:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, help="port to bind (default $PORT, else 8000)")
    parser.add_argument(
        "--workers", type=int, help="worker processes (default $WEB_CONCURRENCY, else 1)"
    )
    parser.add_argument(
        "--forwarded-allow-ips",
        help="addresses whose X-Forwarded-For/-Proto are trusted ('*' behind a load "
        "balancer that overwrites them; default 127.0.0.1)",
    )
    args = parser.parse_args(argv)
    return ServeOptions(
        host=args.host,
        port=args.port if args.port is not None else env_int("PORT", 8000),
        workers=args.workers if args.workers is not None else env_int("WEB_CONCURRENCY", 1),
        forwarded_allow_ips=args.forwarded_allow_ips,
    )


if __name__ == "__main__":
    options = parse_args()
    if options.workers > 1:
        gc.enable()  # the supervisor never builds the app; each worker does, and tunes its own
    serve(options)
