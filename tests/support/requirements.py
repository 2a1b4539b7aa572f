"""Requirement files as the lock exports them (the layer's, the SAM CLI's), read for the tests."""

from __future__ import annotations

import re


def hashed_requirements(text: str) -> dict[str, tuple[str, list[str]]]:
    """A `uv export` requirements file as {normalised name: (pinned version, hashes)}.

    AssertionError on any requirement that is not an exact pin followed by its hashes.
    """
    found: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in text.splitlines():
        line = line.split(" #", 1)[0].rstrip(" \\")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("--hash="):
            assert name, f"a hash before any requirement: {line}"
            found[name][1].append(line.strip().removeprefix("--hash="))
            continue
        requirement = line.split(";", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", requirement)
        assert match, f"not an exact pin of one package: {line!r}"
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        found[name] = (match[2], [])
    for name, (_version, hashes) in found.items():
        assert hashes and all(h.startswith("sha256:") for h in hashes), f"{name} has no hash"
    return found
