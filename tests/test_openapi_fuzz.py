"""The OpenAPI document tells the truth: property-based requests generated from it.

schemathesis reads the running service's own `/openapi.json` and sends
requests generated from it (valid and invalid parameters, with and without
the admin token) to the real service on the simulated upstream with a real
Redis. Every answer must be one the document lists for that operation, with
the documented content type, headers and body schema, and never a 5xx the
document does not promise. The budget is fixed (MAX_EXAMPLES per operation,
derandomized), so the run is the same on every machine and takes seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import RedisServer
from tests.support.replicas import ServiceProcess, SimProcess, clean_env

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "fuzz-admin-token"
MAX_EXAMPLES = 40


@dataclass
class Live:
    url: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root: Path = tmp_path_factory.mktemp("openapi-fuzz")
    redis = RedisServer().start()
    sim = SimProcess(workdir=root / "sim")
    service = ServiceProcess(
        {
            "WHATSAPP_API_URL": f"http://127.0.0.1:{sim.port}",
            "CRM_API_URL": f"http://127.0.0.1:{sim.port}",
            "REDIS_URL": redis.url,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_LEVEL": "warning",
        },
        workdir=root / "service",
    )
    try:
        sim.start()
        service.start()
        yield Live(service.url)
    finally:
        service.stop()
        sim.stop()
        redis.stop()


def test_every_answer_is_one_the_openapi_document_lists(live: Live, tmp_path: Path) -> None:
    # The token opens the admin API; schemathesis also replays requests without
    # it (the `ignored_auth` check) and expects them refused.
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{live.url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261127", "--generation-deterministic",
        "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        "--request-timeout", "30",
        "--max-failures", "20",
        "--no-color",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=clean_env()
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    cases = re.search(r"(\d+) generated", output)
    assert cases, output[-3000:]
    assert int(cases.group(1)) >= 50, output[-3000:]
    print(f"\nschemathesis: {cases.group(0)} test cases in {elapsed:.1f} s")
