"""Shared helpers: render into a temp dir, run a generated project's tests."""

from __future__ import annotations

import importlib
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from scaffold.render import render

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one torch thread each, in the
    # worker and in the generated suites it starts, so none oversubscribes.
    # Set before anything imports torch, which reads it once.
    os.environ["OMP_NUM_THREADS"] = "1"


def import_rendered(project: Path, package: str, module: str):
    """`package.module` of a rendered project, imported in this process."""
    sys.path.insert(0, str(project / "src"))
    try:
        return importlib.import_module(f"{package}.{module}")
    finally:
        sys.path.remove(str(project / "src"))


@pytest.fixture
def render_project(tmp_path: Path):
    def _render(name: str = "proj", **data) -> Path:
        return render(tmp_path / name, data, src=ROOT)

    return _render


def make_venv(path: Path) -> Path:
    """A fresh venv that also sees this interpreter's packages (torch, hatchling).

    system_site_packages would expose the base interpreter's, not this venv's,
    so a .pth file names this interpreter's site-packages instead.
    """
    venv.create(path, with_pip=True)
    child = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(child) / "parent-site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path
