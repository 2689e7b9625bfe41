"""`copier update` of a rendered project: change an answer, and the project still passes its tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import copier
import pytest

from scaffold.matrix import RESEARCH_FEATURES, run_tests
from tests.conftest import ROOT


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


# The last main before `profile` and `features` existed: projects rendered
# from it must update to today's template and keep every capability.
BEFORE_FEATURES = "3d43693"


def copy_checkout(repo: Path) -> None:
    """This checkout's files, committed or not, into `repo` (replacing what is there)."""
    for old in repo.iterdir():
        if old.name != ".git":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
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


def commit_and_tag(repo: Path, tag: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", tag)
    git(repo, "tag", tag)


@pytest.fixture
def template_repo(tmp_path: Path) -> Path:
    """This checkout's files (committed or not) as a tagged git repo, as users consume it."""
    repo = tmp_path / "template"
    repo.mkdir()
    git(repo, "init", "-q")
    copy_checkout(repo)
    commit_and_tag(repo, "v1.0.0")
    return repo


def repo_at(commit: str, repo: Path) -> Path:
    """The template as it was at `commit`, as a git repo tagged v1.0.0."""
    repo.mkdir()
    git(repo, "init", "-q")
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
    commit_and_tag(repo, "v1.0.0")
    return repo


def copy_and_commit(repo: Path, project: Path, data: dict) -> set[str]:
    """A render of `repo`'s v1.0.0, committed in its own git repo; returns its files."""
    copier.run_copy(str(repo), project, data=data, defaults=True, quiet=True)
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "rendered")
    return files_of(project)


def files_of(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file() and ".git" not in p.parts}


@pytest.mark.slow
def test_a_project_from_before_features_updates_and_keeps_every_file(tmp_path):
    """copier update from the last main without `features`: no new answers, nothing lost."""
    repo = repo_at(BEFORE_FEATURES, tmp_path / "template")
    project = tmp_path / "project"
    # small_cnn: which files an update keeps does not depend on the backbone, and its suite runs in a
    # quarter of resnet18's (every backbone's own code is trained in tests/test_backbones.py).
    data = {"checkpoint_formats": ["state_dict", "safetensors", "full"]}
    before = copy_and_commit(repo, project, data)
    assert "features" not in (project / ".copier-answers.yml").read_text()

    copy_checkout(repo)
    commit_and_tag(repo, "v2.0.0")
    copier.run_update(project, defaults=True, overwrite=True, quiet=True)
    answers = (project / ".copier-answers.yml").read_text()
    assert "_commit: v2.0.0" in answers and "profile: research" in answers
    after = files_of(project)
    assert before <= after, f"lost on update: {sorted(before - after)}"
    for feature in RESEARCH_FEATURES:
        assert f"- {feature}" in answers, feature
    assert not list(project.rglob("*.rej")), "the update left conflicts"
    proc = run_tests(project, ["-x", "-m", "not slow"])
    assert proc.returncode == 0, proc.stdout[-4000:]


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


# The last main whose teaching profile rendered template/ (the research
# modules, fewer features): such projects move to teaching/ on update.
BEFORE_TEACHING_EDITION = "3b053ea"


@pytest.mark.slow
def test_an_older_teaching_project_moves_to_the_teaching_edition_or_keeps_its_shape_as_research(tmp_path):
    """README "Upgrading": a plain update gives the teaching edition and removes the files it lacks;
    `--data profile=research --data features=[traps]` keeps every file instead."""
    repo = repo_at(BEFORE_TEACHING_EDITION, tmp_path / "template")
    data = {"profile": "teaching", "checkpoint_formats": ["state_dict", "full"]}
    moved, kept = tmp_path / "moved", tmp_path / "kept"
    before = copy_and_commit(repo, moved, data)
    assert copy_and_commit(repo, kept, data) == before
    assert "src/finetune_demo/runfolder.py" in before  # the research architecture, as it was
    copy_checkout(repo)
    commit_and_tag(repo, "v2.0.0")

    copier.run_update(moved, defaults=True, overwrite=True, quiet=True)
    after = files_of(moved)
    assert "src/finetune_demo/runfolder.py" not in after and "src/finetune_demo/train.py" in after
    assert len(list((moved / "src/finetune_demo").glob("*.py"))) <= 8
    assert "## Upgrading" in (moved / "README.md").read_text()
    assert not list(moved.rglob("*.rej")), "the update left conflicts"
    proc = run_tests(moved, ["-x"])
    assert proc.returncode == 0, proc.stdout[-4000:]

    research = {"profile": "research", "features": ["traps"]}
    copier.run_update(kept, data=research, defaults=True, overwrite=True, quiet=True)
    assert before <= files_of(kept), f"lost on update: {sorted(before - files_of(kept))}"
    assert "profile: research" in (kept / ".copier-answers.yml").read_text()
