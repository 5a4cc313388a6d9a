"""Config parity: the Settings class, `.env.example` and docs/configuration.md name the same
variables, and the two files are what `make config-docs` generates from the class."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from app.config import Settings

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "scripts" / "gen_config_docs.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_generator()


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def env_example_variables() -> set[str]:
    text = (REPO / ".env.example").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))


def documented_variables(section: str) -> set[str]:
    """Variables in the first column of docs/configuration.md's generated tables."""
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    generated = text.split("<!-- BEGIN GENERATED", 1)[1].split("<!-- END GENERATED -->", 1)[0]
    settings, _, env_only = generated.partition("### Environment only")
    part = settings if section == "settings" else env_only
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", part, re.MULTILINE))


def test_every_setting_is_in_env_example_and_nothing_else() -> None:
    assert env_example_variables() == settings_variables()


def test_every_setting_is_in_the_configuration_docs_and_nothing_else() -> None:
    assert documented_variables("settings") == settings_variables()


def test_environment_only_variables_are_documented_apart_from_the_settings(
    gen: ModuleType,
) -> None:
    env_only = {v.name for v in gen.ENVIRONMENT_ONLY}

    assert documented_variables("environment only") == env_only
    assert not env_only & settings_variables()
    assert not env_only & env_example_variables()


def test_environment_only_variables_are_still_read_where_the_docs_say(gen: ModuleType) -> None:
    for var in gen.ENVIRONMENT_ONLY:
        assert var.name in (REPO / var.reader).read_text(encoding="utf-8"), var


def test_every_setting_has_a_description() -> None:
    missing = [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()]

    assert missing == []


def test_generated_files_are_up_to_date(gen: ModuleType) -> None:
    stale = [
        str(path.relative_to(REPO))
        for path, text in gen.outputs().items()
        if path.read_text(encoding="utf-8") != text
    ]

    assert stale == [], "run `make config-docs`"


def test_env_example_defaults_are_the_settings_defaults() -> None:
    """Loading `.env.example` as it is gives the class's own defaults."""
    loaded = Settings(_env_file=REPO / ".env.example")  # type: ignore[call-arg]
    required = {n for n, f in Settings.model_fields.items() if f.is_required()}
    defaults = Settings(_env_file=None, **{n: getattr(loaded, n) for n in required})  # type: ignore[call-arg]

    assert loaded == defaults


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    """`--check` exits 1 when a generated file differs, and leaves it as it is."""
    copy = tmp_path / "repo"
    for folder in ("app", "scripts", "docs"):
        shutil.copytree(REPO / folder, copy / folder)
    stale = (REPO / ".env.example").read_text(encoding="utf-8").replace("=300", "=301")
    (copy / ".env.example").write_text(stale, encoding="utf-8")

    run = subprocess.run(
        [sys.executable, str(copy / "scripts" / "gen_config_docs.py"), "--check"],
        cwd=copy,
        capture_output=True,
        text=True,
        check=False,
    )

    assert run.returncode == 1, run.stderr
    assert ".env.example: stale" in run.stderr
    assert (copy / ".env.example").read_text(encoding="utf-8") == stale
