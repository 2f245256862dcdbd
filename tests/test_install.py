"""The production artefact: built from the lock files, installed with no index.

Slow (builds dist/ from PyPI, ~20-30 s), so it runs with --long.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
ARCH = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artefact() -> Path:
    subprocess.run(["bash", "deploy/build-dist.sh", ARCH], cwd=ROOT, check=True, timeout=600,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHON": sys.executable})
    return ROOT / "dist" / f"storegate-{VERSION}-{ARCH}"


def test_the_artefact_holds_the_locked_wheels_and_no_demo_broker(artefact):
    wheels = {p.name.split("-")[0].lower() for p in (artefact / "wheels").iterdir()}
    assert "storegate" in wheels and "amqtt" not in wheels and "pytest" not in wheels
    assert {"pyscard", "evdev"}.isdisjoint(wheels)  # Debian's, on the box
    subprocess.run(["sha256sum", "--quiet", "--check", "SHA256SUMS"], cwd=artefact, check=True)


def test_install_then_upgrade_keeps_the_previous_version(artefact, tmp_path):
    prefix = tmp_path / "opt"
    install = ["bash", str(artefact / "install.sh"), "--prefix", str(prefix), "--no-system"]
    subprocess.run(install, check=True, timeout=600)
    assert (prefix / "venv").readlink() == Path("versions") / VERSION
    out = subprocess.run([str(prefix / "venv/bin/storegate"), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"storegate {VERSION}"
    probe = subprocess.run([str(prefix / "venv/bin/python"), "-c", "import amqtt"], capture_output=True)
    assert probe.returncode != 0, "the demo's broker is in the production venv"
    # Installing again says so and changes nothing; --force builds a new venv beside the running one.
    again = subprocess.run(install, check=True, capture_output=True, text=True, timeout=600)
    assert "installed already" in again.stdout
    subprocess.run([*install, "--force"], check=True, timeout=600)
    versions = sorted(p.name for p in (prefix / "versions").iterdir())
    assert len(versions) == 2 and (prefix / "venv").readlink() != Path("versions") / VERSION


def test_hq_install_has_its_database_libraries(artefact, tmp_path):
    prefix = tmp_path / "opt"
    subprocess.run(["bash", str(artefact / "install.sh"), "--role", "hq", "--prefix", str(prefix), "--no-system"],
                   check=True, timeout=600)
    out = subprocess.run([str(prefix / "venv/bin/storegate-hq"), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"storegate-hq {VERSION}", out.stderr
