"""The teaching edition's own template (teaching/), while it is built: it renders, passes ruff and its own suite.

copier.yml still renders template/ for both profiles (issue 28 wires
teaching/ in once the root tests around it land), so these tests render
teaching/ through a copy of copier.yml whose _subdirectory names it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold.matrix import run_tests
from scaffold.render import render
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def teaching_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("teaching-src")
    shutil.copytree(ROOT / "teaching", src / "teaching")
    text = (ROOT / "copier.yml").read_text()
    (src / "copier.yml").write_text(re.sub(r"(?m)^_subdirectory: .*$", "_subdirectory: teaching", text))
    return src


def test_the_teaching_template_holds_few_if_tags():
    names = [str(p.relative_to(ROOT / "teaching")) for p in (ROOT / "teaching").rglob("*")]
    texts = [p.read_text() for p in (ROOT / "teaching").rglob("*.jinja")]
    tags = sum(len(re.findall(r"{%-?\s*(?:el)?if\b", t)) for t in [*texts, *names])
    assert tags <= 25


@pytest.mark.slow
@pytest.mark.parametrize(
    "answers",
    [
        {"features": ["traps"], "checkpoint_formats": ["state_dict", "safetensors", "full"]},
        {"features": [], "checkpoint_formats": ["safetensors"], "freeze_by": "none"},
    ],
    ids=["traps-every-format", "bare-safetensors-full-fine-tune"],
)
def test_a_teaching_render_is_small_ruff_clean_and_passes_its_suite(teaching_src: Path, tmp_path: Path, answers):
    data = {"project_name": "lesson", "profile": "teaching", **answers}
    project = render(tmp_path / "lesson", data, src=teaching_src)
    src = project / "src" / "lesson"
    files = sorted(src.glob("*.py"))
    assert len(files) <= (8 if answers["features"] else 7)
    train = (src / "train.py").read_text().splitlines()
    assert len(train) <= 350
    assert any(".backward(" in line for line in train[:100])  # the step is near the top
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=project, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout
    proc = run_tests(project)
    assert proc.returncode == 0, proc.stdout[-3000:]
