"""`copier update` of a rendered project: change an answer, and the project still passes its tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import copier
import pytest

from scaffold.matrix import run_tests
from tests.conftest import ROOT


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def template_repo(tmp_path: Path) -> Path:
    """This checkout's files (committed or not) as a tagged git repo, as users consume it."""
    repo = tmp_path / "template"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split("\0")  # template file names hold spaces: "{% if ... %}"
    for name in files:
        if name and (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "template")
    git(repo, "tag", "v1.0.0")
    return repo


@pytest.mark.slow
def test_update_with_a_changed_answer_keeps_the_project_green(template_repo, tmp_path):
    project = tmp_path / "project"
    copier.run_copy(str(template_repo), project, data={"bn_policy": "eval_frozen"}, defaults=True, quiet=True)
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "rendered")
    assert "_commit: v1.0.0" in (project / ".copier-answers.yml").read_text()

    copier.run_update(project, data={"bn_policy": "replace_frozen"}, defaults=True, overwrite=True, quiet=True)
    assert "bn_policy: replace_frozen" in (project / ".copier-answers.yml").read_text()
    assert "class FrozenBatchNorm" in (project / "src/finetune_demo/batchnorm.py").read_text()
    proc = run_tests(project, ["-x"])
    assert proc.returncode == 0, proc.stdout[-4000:]
