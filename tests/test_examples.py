"""examples/ is what a fresh render gives, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.regen_examples import EXAMPLES, render_example


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_equals_a_fresh_render(tmp_path, name):
    fresh = tree(render_example(name, tmp_path))
    committed = tree(ROOT / "examples" / name)
    assert committed.keys() == fresh.keys(), "run `python -m tests.regen_examples`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale files {stale}; run `python -m tests.regen_examples`"
