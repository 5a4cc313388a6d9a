"""`python -m bench` still runs end to end (tiny durations); it reports, it never judges speed."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("redis-server") is None,
    reason="the benchmark needs wrk and redis-server (scripts/ensure-system-deps.sh bench)",
)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter of its own for the image install (a venv of this one), so that the
    report can be seen to use the one it was given rather than its default."""
    folder = tmp_path_factory.mktemp("image-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory, out: Path, image_python: Path
) -> tuple[dict, str]:
    # An empty folder as the Node.js reference: the run must say so and measure the rest,
    # as it does on a machine without node/npm.
    no_node = tmp_path_factory.mktemp("no-node")
    run = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--node-src", str(no_node),
            "--scenarios", "warm,cold,counts,overload,startup", "--profiles", "light,big",
            "--variant", f"same={REPO},LOG_LEVEL=warning", "--image-python", str(image_python),
            "--out", str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "the Node.js reference is left out, measuring the rest" in run.stderr
    (out / "run.stderr").write_text(run.stderr)
    assert (out / "bench.png").exists() or (out / "bench.svg").exists()
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_warm_scenario_measures_every_target_on_each_profile(results: tuple[dict, str]) -> None:
    data, _ = results
    profiles = data["scenarios"]["warm"]["data"]["profiles"]

    assert list(profiles) == ["light", "big"]
    for profile, section in profiles.items():
        assert set(section["targets"]) == {"service", "same", "image", "passthrough"}, profile
        for name, row in section["targets"].items():
            assert row["rps"] > 0, (profile, name)
            assert row["p50_ms"] > 0, (profile, name)
            assert row["cpu_ms_per_request"] > 0, (profile, name)
            assert row["errors"] == 0, (profile, name)


def test_warm_pages_come_from_nginx_and_are_truly_warm(results: tuple[dict, str]) -> None:
    data, _ = results
    profiles = data["scenarios"]["warm"]["data"]["profiles"]

    for profile, section in profiles.items():
        service = section["targets"]["service"]
        assert service["x_enrichment"] == "complete", profile
        # nginx served every page (the simulator saw none), no id was fetched from the CRM
        assert section["sim_contacts_calls_during_runs"] == 0, profile
        for name, row in section["targets"].items():
            assert row["crm_ids_fetched_during_runs"] == 0, (profile, name)
        # each target reads its own instance, so a CRM fetch can be told apart
        assert len({row["instance"] for row in section["targets"].values()}) == 4
        assert section["prefilled_keys"] == section["ids"], profile
    # the enriched pages have the sizes docs/performance.md gives for the profiles
    assert 35_000 < profiles["light"]["enriched_bytes"] < 55_000
    assert profiles["light"]["contacts"] == 100
    assert 350_000 < profiles["big"]["enriched_bytes"] < 500_000
    assert profiles["big"]["contacts"] == 1000
    assert 600 < profiles["big"]["ids"] < 800


def test_a_variant_is_measured_beside_the_service_on_every_profile(
    results: tuple[dict, str],
) -> None:
    data, text = results
    profiles = data["scenarios"]["warm"]["data"]["profiles"]

    for profile, section in profiles.items():
        variant = section["targets"]["same"]
        assert variant["label"] == "service [same]", profile
        assert variant["x_enrichment"] == "complete", profile
        assert variant["cpu_over_service"] > 0, profile
        assert section["targets"]["service"]["cpu_over_service"] is None, profile
    assert data["scenarios"]["cold"]["data"]["paired_vs_service"]["same"]["pairs"] == 3
    assert "| service [same] |" in text


def test_cold_scenario_compares_with_the_upstream_called_directly(
    results: tuple[dict, str],
) -> None:
    data, _ = results
    section = data["scenarios"]["cold"]["data"]

    assert section["profile"] == "big"
    assert set(section["targets"]) == {"upstream", "service", "same", "image"}
    # 576 customers and 100 users in batches of 100: the same 7 CRM calls for both
    assert section["targets"]["upstream"]["crm_calls_per_request"] == 7
    assert section["targets"]["service"]["crm_calls_per_request"] == 7
    assert section["partial_responses"] == 0
    assert section["upstream_direct_ms"] >= section["crm_ms"]
    assert section["service_overhead_ms"] == pytest.approx(
        section["targets"]["service"]["p50_ms"] - section["upstream_direct_ms"]
    )
    assert section["service_overhead_over_node"] is None  # no Node.js here


def test_counts_scenario_counts_redis_and_crm(results: tuple[dict, str]) -> None:
    data, _ = results
    rows = {(r["name"], r["case"]): r for r in data["scenarios"]["counts"]["data"]["rows"]}

    assert {name for name, _ in rows} == {"service", "service-noredis"}
    assert len(rows) == 6
    cold = rows["service", "cold (new instance each)"]
    assert cold["redis_commands_total"] > 0
    assert cold["crm_calls"] > 0
    assert rows["service-noredis", "warm, every id exists"]["crm_ids"] > 0


def test_overload_scenario_compares_the_admission_limit(results: tuple[dict, str]) -> None:
    data, _ = results
    section = data["scenarios"]["overload"]["data"]

    assert set(section["targets"]) == {"service", "service-unlimited", "same", "image"}
    for name, row in section["targets"].items():
        assert row["rps"] > 0, name
        assert row["requests"] > 0, name
        assert row["http_errors"] == 0, name
    assert section["service_vs_unlimited"] > 0


def test_startup_is_measured_from_the_development_environment_and_the_image_install(
    results: tuple[dict, str], out: Path
) -> None:
    data, text = results
    startup = data["scenarios"]["startup"]["data"]

    assert set(startup) == {"service", "service-image"}  # (and "node", where it runs)
    assert all(len(t["runs_s"]) == 2 and min(t["runs_s"]) > 0 for t in startup.values())
    assert "start-up to /health 200, image install" in text
    # The image install: the service as a package, no test tools...
    install = out / "image-install"
    probe = subprocess.run(
        [str(install / "bin" / "python"), "-c", "import app; print(app.__file__); import rich"],
        cwd=install,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "site-packages" in probe.stdout
    assert "No module named 'rich'" in probe.stderr
    # ... built from this checkout as it is, nothing more, nothing less.
    for package in ("app", "simupstream"):
        installed = Path(probe.stdout.strip()).parent.parent / package
        sources = sorted(p.relative_to(REPO / package) for p in (REPO / package).rglob("*.py"))
        assert sources == sorted(p.relative_to(installed) for p in installed.rglob("*.py"))
        for path in sources:
            assert (installed / path).read_bytes() == (REPO / package / path).read_bytes()


def test_the_image_install_is_a_target_of_its_own(
    results: tuple[dict, str], image_python: Path
) -> None:
    data, text = results
    built_with = f"Python {platform.python_version()}, {image_python}"
    for profile in data["scenarios"]["warm"]["data"]["profiles"].values():
        image = profile["targets"]["image"]
        assert image["label"] == f"service, image install [image: {built_with}]"
        assert image["cpu_ms_per_request"] > 0
        assert image["x_enrichment"] == "complete"
    assert data["scenarios"]["cold"]["data"]["targets"]["image"]["p50_ms"] > 0
    assert data["scenarios"]["startup"]["data"]["service-image"]["label"].endswith(
        f"({built_with})"
    )
    assert "warm CPU per request, Node.js / image install: light" in text


def test_the_image_install_is_built_once_before_any_scenario(
    results: tuple[dict, str], out: Path
) -> None:
    """uv sync takes seconds: not on a scenario's clock (its timeout), nor in its event loop."""
    log = (out / "run.stderr").read_text()
    assert log.count("installing the service as the image does") == 1
    assert log.index("image install built in") < log.index("scenario warm")


def test_an_image_install_that_fails_in_any_way_fails_once_and_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uv hanging past its timeout is a failed install like uv refusing: the scenarios that
    need it fail with the reason, the run goes on, and it is not tried again."""
    from bench.runtime import RuntimeUnavailable
    from bench.scenarios import common

    calls = 0

    def hung(python: str, target: Path) -> str:
        nonlocal calls
        calls += 1
        raise subprocess.TimeoutExpired(["uv", "sync"], 600)

    monkeypatch.setattr(common, "runtime_python", hung)
    no_stack: Any = None  # (the install needs none)
    ctx = common.Context(no_stack, common.Options(), lambda _: None, workdir=tmp_path)

    for _ in range(2):
        with pytest.raises(RuntimeUnavailable, match="TimeoutExpired"):
            ctx.installed()
    assert calls == 1


def test_an_image_python_that_does_not_exist_or_a_variant_named_image_is_refused() -> None:
    from bench import cli

    with pytest.raises(SystemExit, match="no such interpreter"):
        cli.options_from(cli.build_parser().parse_args(["--image-python", "/nonexistent/py"]))
    with pytest.raises(SystemExit, match="is --image-python's"):
        cli.options_from(cli.build_parser().parse_args(["--variant", f"image={REPO}"]))


def test_a_missing_node_reference_is_reported_not_fatal(results: tuple[dict, str]) -> None:
    data, text = results

    assert data["args"]["node_left_out"].startswith("The Node.js reference was not measured")
    assert "## Left out" in text
    assert "The Node.js reference was not measured: no Node.js reference in" in text


def test_node_and_npm_missing_is_said_before_anything_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import stack

    monkeypatch.setattr(stack.shutil, "which", lambda name: None)
    with pytest.raises(stack.NodeUnavailable, match="node and npm not installed"):
        stack.prepare_node(REPO / "bench" / "seed-node", cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_node_reference_is_in_the_repository_with_locked_dependencies() -> None:
    folder = REPO / "bench" / "seed-node"
    package = json.loads((folder / "package.json").read_text())
    lock = json.loads((folder / "package-lock.json").read_text())

    assert (folder / "server.js").exists()
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} {version}: not an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert lock["packages"][""]["dependencies"] == package["dependencies"]


def test_markdown_report_has_the_tables(results: tuple[dict, str]) -> None:
    _, text = results

    assert "## Summary" in text
    assert "## 1. Warm cache" in text
    assert "## 2. Cold cache" in text
    assert "| light (" in text
    assert "| big (" in text
    assert "## 3. Per request, counted" in text
    assert "## 7. Overload" in text
    assert "| service |" in text
    assert "| bare pass-through |" in text
    assert "Machine:" in text


def test_report_says_uncommitted_only_when_the_tree_has_changes(
    results: tuple[dict, str],
) -> None:
    data, report = results
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if status.returncode != 0:
        assert data["machine"]["git_dirty"] is None  # not a checkout: no claim either way
    else:
        dirty = status.stdout.strip() != ""
        assert data["machine"]["git_dirty"] is dirty
        assert ("(with uncommitted changes)" in report) is dirty


def test_cold_variants_are_compared_request_by_request() -> None:
    from bench.scenarios.cold import _paired

    times = {"service": [50.0, 60.0, 90.0], "b": [48.0, 59.0, 70.0], "c": [55.0]}
    paired = _paired(times, ["b", "c"])

    # b - service per pair: -2, -1, -20 (a slow spell that hit the service's request)
    assert paired["b"] == {"median_ms": -2.0, "mean_ms": -23 / 3, "pairs": 3}
    assert paired["c"] == {"median_ms": 5.0, "mean_ms": 5.0, "pairs": 1}


def test_every_id_a_profile_references_exists_in_the_simulated_crm() -> None:
    from bench.profiles import PROFILES, SIM_USERS
    from simupstream import data

    for profile in PROFILES.values():
        cids, uids = profile.referenced()
        assert len(cids) == len(set(cids)) > 0, profile.name
        for cid in cids:
            k = data.parse_customer_id(cid)
            assert k is not None, (profile.name, cid)
            assert data.customer("any", k) is not None, (profile.name, cid)
        for uid in uids:
            k = data.parse_user_id(uid)
            assert k is not None, (profile.name, uid)
            assert data.user("any", k, SIM_USERS) is not None, (profile.name, uid)


def test_profiles_have_the_documented_shapes() -> None:
    from bench.profiles import PROFILES

    light, fat, big = PROFILES["light"], PROFILES["fat"], PROFILES["big"]
    sizes = {name: len(value) for name, value in fat.cache_entries("fat")}
    fat_customers = [v for k, v in sizes.items() if k.startswith("customer:")]
    light_customers = [len(v) for k, v in light.cache_entries("light") if k.startswith("customer:")]

    assert 600 < sum(fat_customers) / len(fat_customers) < 900
    assert 150 < sum(light_customers) / len(light_customers) < 250
    assert 100_000 < fat.enriched_bytes() < 130_000
    assert sum(map(len, light.referenced())) in range(100, 140)
    assert big.contacts == 1000
    # keys are those both designs use in the token mode: customer:<instance>:<id>
    assert next(iter(light.cache_entries("light")))[0] == "customer:light:1"


def test_unknown_profiles_are_refused_by_name() -> None:
    from bench import cli

    with pytest.raises(SystemExit, match="unknown profiles \\['huge'\\]; known: light, fat, big"):
        cli.options_from(cli.build_parser().parse_args(["--profiles", "light,huge"]))
    options = cli.options_from(cli.build_parser().parse_args(["--profiles", "big,light"]))
    assert options.profiles == ("big", "light")
