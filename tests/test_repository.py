"""The repository stands on its own: a clone needs nothing beside it, and the docs' links
lead to files that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built from parts so that this file does not match itself.
OUTSIDE = ("../" + "shared", '"' + "shared" + '" /', "parent / " + '"shared"')


def tracked_files() -> list[Path]:
    run = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=False
    )
    if run.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / name for name in run.stdout.decode().split("\0") if name]


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(REPO)}: {p!r}" for p in OUTSIDE if p in text]

    assert offenders == []


def markdown_files() -> list[Path]:
    return [REPO / "README.md", REPO / "bench" / "README.md", *sorted(REPO.glob("docs/*.md"))]


LINK = re.compile(r"\]\(([^)\s]+)\)")


#: Pages another branch adds (the monitoring stack's); checked like any other once they exist.
def test_relative_links_in_the_docs_lead_to_files_that_exist() -> None:
    broken = []
    for doc in markdown_files():
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")

    assert broken == []
