"""Shared helpers: render into a temp dir, run a generated project's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaffold.render import render

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def render_project(tmp_path: Path):
    def _render(name: str = "proj", **data) -> Path:
        return render(tmp_path / name, data, src=ROOT)

    return _render
