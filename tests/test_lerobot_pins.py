"""dinocache and LeRobot in one environment: the README's statement of LeRobot's pins is what the
installed LeRobot declares, and no bound of dinocache's excludes what LeRobot pins.

Runs where ``lerobot`` is installed (CI's LeRobot environment, made by the user's own one command);
elsewhere it skips. A floor above LeRobot's (dinocache once asked PyAV >= 18 while LeRobot pins
PyAV 15) lets pip replace LeRobot's package and break it without a word from ``pip check``.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
#: The extras of ``pip install "lerobot[training]"``, followed as LeRobot's metadata chains them.
TRAINING_EXTRAS = ("training", "dataset", "av-dep", "accelerate-dep")

pytest.importorskip("lerobot")


def lerobot_pins() -> dict[str, Requirement]:
    """What ``lerobot[training]`` requires, by canonical package name (its self-references left out)."""
    pins: dict[str, Requirement] = {}
    for line in importlib.metadata.requires("lerobot") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        wanted = marker is None or any(marker.evaluate({"extra": extra}) for extra in TRAINING_EXTRAS)
        if wanted and canonicalize_name(requirement.name) != "lerobot":
            pins[canonicalize_name(requirement.name)] = requirement
    return pins


def readme_statement() -> tuple[str, dict[str, Requirement]]:
    """The README's sentence 'LeRobot X.Y.Z ... pins `spec`, `spec` ...': the version and the pins."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"LeRobot (\d+\.\d+\.\d+)[^.]*? pins ((?:`[^`]+`[^`.]*)+)", text)
    assert found, "README.md no longer states LeRobot's pins as 'LeRobot X.Y.Z ... pins `...`'"
    specs = [Requirement(spec) for spec in re.findall(r"`([^`]+)`", found.group(2))]
    return found.group(1), {canonicalize_name(r.name): r for r in specs}


def test_the_readme_states_the_installed_lerobots_pins():
    version, stated = readme_statement()
    installed = importlib.metadata.version("lerobot")
    assert version == installed, f"README.md describes LeRobot {version}, this environment has {installed}"
    pins = lerobot_pins()
    for name, requirement in stated.items():
        assert name in pins, f"README.md says LeRobot pins {requirement}; LeRobot {installed} does not require {name}"
        assert requirement.specifier == pins[name].specifier, \
            f"README.md says LeRobot pins {requirement}; LeRobot {installed} requires {pins[name]}"


def test_no_bound_of_dinocaches_excludes_lerobots_floor():
    """For every package both require, LeRobot's lowest admitted version is admitted here too."""
    ours = {canonicalize_name(r.name): r for r in
            map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])}
    checked = []
    for name, theirs in lerobot_pins().items():
        floors = [s.version for s in theirs.specifier if s.operator in (">=", "==", "~=")]
        if name not in ours or not floors:
            continue
        for floor in floors:
            assert ours[name].specifier.contains(floor, prereleases=True), \
                f"pyproject.toml asks {ours[name]}, which excludes {name} {floor} that LeRobot admits ({theirs})"
        checked.append(name)
    assert {"torch", "torchvision", "numpy", "av", "pyarrow"} <= set(checked), checked
