"""The teaching edition (teaching/, `profile=teaching`): small enough to read in one sitting, and it works.

Its size limits are issue 28's, measured on a small_cnn render with and
without `traps`; the README's table of renders reports the same numbers.
Every backbone renders and trains; small_cnn, resnet18, timm and custom
run their own suites.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaffold.matrix import DIMENSIONS, run_tests
from scaffold.render import render
from tests.conftest import ROOT
from tests.render_table import lines, longest_function

EXTRA = {"timm": {"timm_model": "vit_tiny_patch16_224"}}


def teaching(tmp_path: Path, name: str, **answers) -> Path:
    return render(tmp_path / name, {"project_name": name, "profile": "teaching", **answers}, src=ROOT)


def if_tags(root: Path) -> int:
    """`{% if %}` and `{% elif %}` tags in the files under `root` and in their names."""
    paths = [p for p in root.rglob("*") if p.is_file()]
    texts = [str(p.relative_to(root)) for p in paths] + [p.read_text() for p in paths]
    return sum(len(re.findall(r"{%-?\s*(?:el)?if\b", text)) for text in texts)


def test_the_teaching_template_branches_on_few_answers():
    assert if_tags(ROOT / "teaching") <= 25


def test_a_teaching_render_records_the_teaching_default(tmp_path):
    project = teaching(tmp_path, "lesson")
    recorded = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert (recorded["profile"], recorded["features"]) == ("teaching", ["traps"])
    assert not (project / "src" / "lesson" / "runfolder.py").exists()  # the research edition's, not this one's


def code_shape(package: Path) -> dict:
    """What issue 28 limits: lines, files, train.py's length and where its step is, functions, imports."""
    files = {p.stem: p for p in package.glob("*.py")}
    train = files["train"].read_text().splitlines()
    graph, takes_config = {}, set()
    for stem, path in files.items():
        tree = ast.parse(path.read_text())
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        # `from .config import X` imports config; `from . import freeze` imports freeze.
        graph[stem] = {n.module or a.name for n in relative for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                if any(ast.unparse(a.annotation or ast.Constant(None)) == "Config" for a in node.args.args):
                    takes_config.add(stem)
    return {
        "lines": sum(map(lines, files.values())),
        "files": len(files),
        "train": len(train),
        "step": next(i for i, line in enumerate(train, 1) if ".backward(" in line),
        "longest": longest_function(list(files.values()))[0],
        "graph": graph,
        # Where the config goes from fit: config.py defines it; traps is its own command, not on fit's path.
        "takes_config": takes_config - {"config", "traps"},
    }


def assert_no_cycles(graph: dict[str, set[str]]) -> None:
    def visit(stem: str, path: tuple[str, ...]) -> None:
        for other in graph.get(stem, ()):
            assert other not in path, f"import cycle: {' -> '.join((*path, other))}"
            visit(other, (*path, other))

    for stem in graph:
        visit(stem, (stem,))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("answers", "limits"),
    [
        ({"checkpoint_formats": ["state_dict", "safetensors", "full"]}, {"lines": 1250, "files": 8}),
        ({"features": [], "checkpoint_formats": ["state_dict", "safetensors", "full"]}, {"lines": 1000, "files": 7}),
        (
            {"features": [], "checkpoint_formats": ["safetensors"], "freeze_by": "none", "bn_policy": "train"},
            {"lines": 1000, "files": 7},
        ),
    ],
    ids=["traps-every-format", "bare-every-format", "bare-safetensors-full-fine-tune"],
)
def test_a_small_cnn_teaching_render_meets_its_size_limits_and_passes_its_suite(tmp_path, answers, limits):
    project = teaching(tmp_path, "lesson", **answers)
    shape = code_shape(project / "src" / "lesson")
    assert shape["lines"] <= limits["lines"] and shape["files"] <= limits["files"], shape
    assert shape["train"] <= 350 and shape["step"] <= 100 and shape["longest"] <= 60, shape
    assert len(shape["takes_config"]) <= 4, shape["takes_config"]
    assert_no_cycles(shape["graph"])
    assert len((project / "README.md").read_text().splitlines()) <= 200
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=project, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout
    proc = run_tests(project)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "timm", "custom"])
def test_a_teaching_render_of_another_family_passes_its_suite(tmp_path, backbone):
    project = teaching(tmp_path, "lesson", backbone=backbone, **EXTRA.get(backbone, {}))
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=project, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout
    proc = run_tests(project, ["-x"])
    assert proc.returncode == 0, proc.stdout[-3000:]


# Trained below by the command line alone; the families above run their whole suite.
OTHER_BACKBONES = [b for b in DIMENSIONS["backbone"] if b not in ("small_cnn", "resnet18", "timm", "custom")]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", OTHER_BACKBONES)
def test_every_torchvision_backbone_trains_in_the_teaching_edition(tmp_path, backbone):
    project = teaching(tmp_path, "lesson", backbone=backbone, features=[])
    tiny = [
        "--set",
        "model.image_size=32",
        "--set",
        "data.synthetic_train_size=8",
        "--set",
        "data.synthetic_val_size=4",
        "--set",
        "train.batch_size=4",
    ]
    run = [sys.executable, "-m", "lesson.train", *tiny, "train", "--epochs", "1", "--out", "runs/a", "--device", "cpu"]
    env = {"PYTHONPATH": str(project / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(run, cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 0: train_loss" in proc.stdout
    assert {"metrics.csv", "freeze_manifest.json", "best.pt", "last.ckpt"} <= {
        p.name for p in (project / "runs/a").iterdir()
    }
