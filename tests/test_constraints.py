"""Tested versions: constraints.txt pins what CI ran with, inside the package's own ranges, and CI and the README's
commands install through it."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def test_every_declared_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pinned = pins()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{req.name}=={pinned[name]} outside {req}"


def test_ci_and_the_readme_install_through_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.count("-c constraints.txt") == 2
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for line in readme.splitlines() if line.endswith("python -m pytest"))
    assert test_command.count("-c constraints.txt") == 2
    assert "pip install -U -e \".[dev,eval,compressed]\" && python -m pytest" in readme  # the newest-versions command
