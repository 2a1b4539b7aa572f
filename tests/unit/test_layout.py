"""README's layout section matches the tree: every path it names exists, every top-level folder
and every package is named, and each listed package's modules are named in its line."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where packages live (a folder with an __init__.py under one of these is a package).
PACKAGE_ROOTS = ("shared", "cli", "dev", "tests/support")


def layout() -> dict[str, str]:
    """README's layout block as {path: its description, continuation lines included}."""
    text = (ROOT / "README.md").read_text()
    block = text.split("\n## Layout\n", 1)[1].split("```\n", 2)[1]
    entries: dict[str, str] = {}
    path = ""
    for line in block.splitlines():
        if line and not line[0].isspace():
            path, _, description = line.partition(" ")
            entries[path] = description
        elif path:
            entries[path] += " " + line.strip()
    return entries


def tracked() -> list[str]:
    done = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.splitlines()


def named(word: str, description: str) -> bool:
    return re.search(rf"(?<![\w/.]){re.escape(word)}(?![\w])", description) is not None


ENTRIES = layout()


@pytest.mark.parametrize("path", ENTRIES)
def test_every_path_named_exists(path):
    matches = list(ROOT.glob(re.sub(r"<\w+>", "*", path.rstrip("/"))))

    assert matches, f"README's layout names {path}, which is not in the tree"


def test_every_top_level_folder_is_named():
    folders = {name.split("/", 1)[0] for name in tracked() if "/" in name}
    listed = {path.split("/", 1)[0] for path in ENTRIES}

    assert folders - listed == set(), "top-level folders missing from README's layout"


def test_every_package_is_named_as_an_entry_or_in_its_parents_line():
    packages = sorted(
        str(init.parent.relative_to(ROOT)) + "/"
        for root in PACKAGE_ROOTS
        for init in (ROOT / root).rglob("__init__.py")
        if ".venv" not in init.parts
    )
    missing = [
        package
        for package in packages
        if package not in ENTRIES
        and not named(
            Path(package).name + "/", ENTRIES.get(str(Path(package).parent) + "/", "") + " "
        )
    ]

    assert packages and missing == []


@pytest.mark.parametrize("path", [p for p in ENTRIES if (ROOT / p / "__init__.py").is_file()])
def test_each_listed_package_names_its_modules_and_data(path):
    folder = ROOT / path
    parts = [
        f.stem if f.suffix == ".py" else f.name + ("/" if f.is_dir() else "")
        for f in folder.iterdir()
        if f.name not in ("__init__.py", "__main__.py", "__pycache__")
        and not (f.is_dir() and (f / "__init__.py").is_file() and f"{path}{f.name}/" in ENTRIES)
    ]
    description = ENTRIES[path]

    assert [part for part in parts if not named(part.rstrip("/"), description)] == []


def test_the_check_is_live():
    """A layout naming a folder that is not there, or leaving a module out, fails."""
    assert not list(ROOT.glob("dev/formcall_dev/nowhere"))
    assert not named("dispatcher", "the local QStash: server, store, headers")
    assert named("dispatcher", "the local QStash: server, store, dispatcher, headers")
    assert not named("app", "the local console: views/app.py")
