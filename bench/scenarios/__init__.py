"""The benchmark's scenarios, one module per family; each returns a `Section` of the report.

- warm.py: the headline, CPU per request per page profile, against the Node.js design
- cold.py: a page of 1,000 contacts of a new instance per request, overhead over direct calls
- counts.py: Redis commands and round trips, CRM calls and ids per request, counted
- memory.py: RSS and Redis memory after many distinct customers
- startup.py: process start to `/health` 200
- stampede.py: concurrent cold requests, CRM fetches per unique id
- overload.py: several times the warm load, with and without the admission limit
- common.py: options, targets, report sections and helpers they share
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.scenarios.cold import cold
from bench.scenarios.common import Context, Options, Section, Variant
from bench.scenarios.counts import counts
from bench.scenarios.memory import memory
from bench.scenarios.overload import overload
from bench.scenarios.stampede import stampede
from bench.scenarios.startup import startup
from bench.scenarios.warm import warm

SCENARIOS: dict[str, Callable[[Context], Awaitable[Section]]] = {
    "warm": warm,
    "cold": cold,
    "counts": counts,
    "memory": memory,
    "startup": startup,
    "stampede": stampede,
    "overload": overload,
}

__all__ = ["SCENARIOS", "Context", "Options", "Section", "Variant"]
