"""freeze-scaffold: new (from an installed wheel too), layers, matrix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold.cli import main
from tests.conftest import ROOT, make_venv


def test_new_renders_with_answers(tmp_path, capsys):
    assert (
        main(["new", str(tmp_path / "p"), "--data", "backbone=resnet18", "--data", "checkpoint_formats=[safetensors]"])
        == 0
    )
    answers = (tmp_path / "p" / ".copier-answers.yml").read_text()
    assert "backbone: resnet18" in answers and "- safetensors" in answers


def test_new_with_a_bad_answer_says_why(tmp_path, capsys):
    assert main(["new", str(tmp_path / "p"), "--data", "num_classes=1"]) == 2
    assert "num_classes must be at least 2" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_layers_prints_the_backbone_table(backbone):
    proc = subprocess.run(
        [sys.executable, "-m", "scaffold", "layers", backbone, "--json"], capture_output=True, text=True, check=True
    )
    table = json.loads(proc.stdout)
    names = [c["name"] for c in table["children"]]
    assert names[-1] == {"small_cnn": "head", "resnet18": "fc"}[backbone]
    assert all(p["state"] == "trainable" for p in table["parameters"])


def test_layers_spec_is_a_dry_run_on_the_backbone():
    """The seeds' ResNet recipe (children 0-6 frozen: `ct < 7`) as one selector."""
    command = [sys.executable, "-m", "scaffold", "layers", "resnet18", "--spec", "idx:..7", "--spec", "layer1.0.conv1"]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:-1]}
    # conv1 9,408 + bn1 128 + layer1 147,968 + layer2 525,568 + layer3 2,099,712: children 0..6.
    assert rows["idx:..7"][2] == "2,782,784"
    assert rows["layer1.0.conv1"][1:3] == ["1", "36,864"]
    assert "together: " in proc.stdout.splitlines()[-1]


def test_matrix_renders_and_reports(tmp_path, capsys):
    assert main(["matrix", "--out", str(tmp_path), "--limit", "2", "--render-only"]) == 0
    out = capsys.readouterr().out
    assert "2 passed, 0 failed" in out
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.slow
def test_new_works_from_an_installed_wheel(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("freeze_template-*.whl"))
    env_dir = make_venv(tmp_path / "env")
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    # Run from an unrelated directory, so only the wheel's copy of the template can be found.
    proc = subprocess.run(
        [str(env_dir / "bin" / "freeze-scaffold"), "new", "made", "--data", "freeze_by=index"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    located = subprocess.run(
        [python, "-c", "import scaffold.render as r; print(r.template_root())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert "site-packages" in located
    assert (Path(tmp_path) / "made" / "src" / "finetune_demo" / "freeze.py").is_file()


def test_template_repo_code_is_ruff_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "scaffold", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
