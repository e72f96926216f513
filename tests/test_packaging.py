"""How pagedserve is installed: the Makefile's targets and pyproject.toml's metadata."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _make_dry_run(target: str, tmp_path: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_make_run_installs_no_test_packages(tmp_path) -> None:
    run = _make_dry_run("run", tmp_path)
    assert "pip install -q -e ." in run and "[test]" not in run
    test = _make_dry_run("test", tmp_path)
    assert 'pip install -q -e ".[test]"' in test and "pytest -q" in test


def test_pyproject_metadata_has_no_deprecated_license_table() -> None:
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip("this setuptools predates license expressions (PEP 639)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [w for w in caught if "license" in str(w.message)]


def test_the_cpu_kernels_sources_ship_in_the_package() -> None:
    """setup.py compiles them at install time, and the engine at run time where the install had
    no compiler: a wheel or sdist without them could do neither."""
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert "ops/cpu_kernels/csrc/*" in dist.package_data["pagedserve"]
    sources = {p.name for p in (ROOT / "pagedserve" / "ops" / "cpu_kernels" / "csrc").iterdir()}
    assert {"kernels.h", "kernels.cpp", "thread_pool.cpp", "probe.c"} <= sources
