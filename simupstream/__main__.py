"""Command line: ``python -m simupstream [--host H] [--port P] ...``.

Every option defaults to an environment variable (``SIM_HOST``, ``SIM_PORT``,
``SIM_CUSTOMERS``, ``SIM_USERS``, ``SIM_LATENCY_MS``, ``SIM_TOKEN``) so
docker-compose can configure the simulator without a command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence

import uvicorn

from . import data
from .app import ENDPOINTS, SimState, create_app


def parse_latency(text: str) -> dict[str, float]:
    """``"contacts=5,customers=20"`` (or one number for all) as milliseconds."""
    text = text.strip()
    if not text:
        return {}
    try:
        if "=" not in text:
            return dict.fromkeys(ENDPOINTS, float(text))
        out: dict[str, float] = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {name!r}")
            out[name] = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad latency {text!r}: {exc}") from None
    if any(ms < 0 for ms in out.values()):
        raise argparse.ArgumentTypeError("latencies must be >= 0")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from the environment."""
    env = os.environ
    # String defaults go through ``type`` too, so a bad variable is reported
    # like a bad option.
    parser = argparse.ArgumentParser(
        prog="python -m simupstream", description="Simulated WhatsApp/CRM upstream."
    )
    parser.add_argument("--host", default=env.get("SIM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=env.get("SIM_PORT", "8081"))
    parser.add_argument(
        "--customers",
        type=int,
        default=env.get("SIM_CUSTOMERS", str(data.DEFAULT_CUSTOMERS)),
        help="customers (and contacts) per instance",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=env.get("SIM_USERS", str(data.DEFAULT_USERS)),
        help="users (agents) per instance",
    )
    parser.add_argument(
        "--latency-ms",
        type=parse_latency,
        default=env.get("SIM_LATENCY_MS", ""),
        help="e.g. contacts=5,customers=20,users=20 (or one number for all)",
    )
    parser.add_argument(
        "--token",
        default=env.get("SIM_TOKEN") or None,
        help="require 'Authorization: Bearer TOKEN' on data endpoints",
    )
    parser.add_argument("--log-level", default=env.get("SIM_LOG_LEVEL", "warning"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve the simulator with uvicorn."""
    args = build_parser().parse_args(argv)
    if args.customers < 1 or args.users < 1:
        raise SystemExit("--customers and --users must be >= 1")
    latency = dict.fromkeys(ENDPOINTS, 0.0)
    latency.update(args.latency_ms)
    state = SimState(
        customers=args.customers, users=args.users, token=args.token, latency_ms=latency
    )
    uvloop = importlib.util.find_spec("uvloop") is not None
    uvicorn.run(
        create_app(state),
        host=args.host,
        port=args.port,
        loop="uvloop" if uvloop else "asyncio",
        http="httptools",
        access_log=False,
        log_level=args.log_level,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
