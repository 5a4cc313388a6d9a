"""A simulated WhatsApp/CRM upstream for tests, demos and benchmarks.

Serves ``/{instance}/contacts``, ``/{instance}/customers?ids=`` and
``/{instance}/users?ids=`` from deterministic synthetic data, with a control
API under ``/_sim/`` for latency, failure injection and call counters.
Run it with ``python -m simupstream``.
"""

from .app import Failure, SimApp, SimState, create_app

__all__ = ["Failure", "SimApp", "SimState", "create_app"]
