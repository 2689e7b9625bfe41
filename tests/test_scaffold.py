"""freeze-scaffold: new (from an installed wheel too), layers, matrix."""

from __future__ import annotations

import json
import os
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


# Each backbone value, a timm name and a user's factory, with the last child the table must show.
LAYERS = {
    "small_cnn": "head",
    "resnet18": "fc",
    "resnet50": "fc",
    "vgg16_bn": "classifier",
    "mobilenet_v3_large": "classifier",
    "efficientnet_b0": "classifier",
    "convnext_tiny": "classifier",
    "vit_b_16": "heads",
    "timm:resnet10t": "fc",
    "user_model:build": "head",
}


@pytest.mark.parametrize("backbone", list(LAYERS))
def test_layers_prints_the_backbone_table(backbone, tmp_path):
    # A user's own factory, importable from the directory the command runs in.
    (tmp_path / "user_model.py").write_text(
        "from torch import nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(4, 8)\n"
        "        self.head = nn.Linear(8, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.body(x).relu())\n\n\n"
        "def build(num_classes):\n"
        "    return Net(num_classes)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "scaffold", "layers", backbone, "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout)
    names = [c["name"] for c in table["children"]]
    assert names[-1] == LAYERS[backbone]
    assert all(p["state"] == "trainable" for p in table["parameters"])


def test_new_checks_a_timm_name_against_timm_and_fills_its_head(tmp_path, capsys):
    assert main(["new", str(tmp_path / "bad"), "--data", "backbone=timm", "--data", "timm_model=resnt18"]) == 2
    assert "closest: resnet18" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["new", str(tmp_path / "p"), "--data", "backbone=timm", "--data", "timm_model=convnext_atto"]) == 0
    answers = (tmp_path / "p" / ".copier-answers.yml").read_text()
    assert "timm_head: head.fc" in answers and "timm_model: convnext_atto" in answers


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
