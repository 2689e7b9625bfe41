"""Generated projects pass their own test suites, and the console script works as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaffold.matrix import RESEARCH_FEATURES, TRACKERS, run_tests
from tests.conftest import make_venv

# A representative subset: every freeze_by, BN policy and format at least
# once, both backbones, unfreeze on and off. The full pairwise matrix is
# `freeze-scaffold matrix`.
SUBSET = {
    "defaults": {},
    "core-traps-all-formats": {"features": ["traps"], "checkpoint_formats": ["state_dict", "safetensors", "full"]},
    "name-eval_all-all-formats-unfreeze": {
        "freeze_by": "name",
        "bn_policy": "eval_all",
        "checkpoint_formats": ["state_dict", "safetensors", "full"],
        "unfreeze_at_epoch": 1,
    },
    "index-train-state_dict-trackers": {
        "freeze_by": "index",
        "bn_policy": "train",
        "checkpoint_formats": ["state_dict"],
        "features": [*RESEARCH_FEATURES, *TRACKERS],
    },
    "pattern-replace_frozen-unfreeze-trackers": {
        "features": [*RESEARCH_FEATURES, *TRACKERS],
        "freeze_by": "pattern",
        "bn_policy": "replace_frozen",
        "checkpoint_formats": ["safetensors", "full"],
        "unfreeze_at_epoch": 1,
    },
    "none-eval_all-safetensors": {"freeze_by": "none", "bn_policy": "eval_all", "checkpoint_formats": ["safetensors"]},
    "resnet18-pattern-replace_frozen-unfreeze": {
        "backbone": "resnet18",
        "freeze_by": "pattern",
        "bn_policy": "replace_frozen",
        "checkpoint_formats": ["state_dict", "full"],
        "unfreeze_at_epoch": 1,
    },
    # LoRA on Conv2d, with the features that read its names (its linear probe, lora.target = [], runs the
    # feature cache); Linears below. small_cnn: resnet18's LoRA training and merge are in test_backbones,
    # and its feature cache in the resnet18 suite above.
    "lora-all-formats": {
        "freeze_by": "lora",
        "checkpoint_formats": ["state_dict", "safetensors", "full"],
        "features": ["ema", "lr_shaping", "export", "feature_cache"],
    },
}


# resnet18's whole suite takes 17 minutes on a CPU, and its features' and run folder's tests repeat what the
# small_cnn suite of the same answers (pattern-replace_frozen-unfreeze-trackers) runs. On resnet18 the files
# where a real backbone meets those answers: FrozenBatchNorm in a real network, its release by a stage, what
# train leaves bit-identical, an export folding it, the feature cache (7 minutes).
ON_A_REAL_BACKBONE = {
    "resnet18-pattern-replace_frozen-unfreeze": [
        f"tests/test_{name}.py"
        for name in ("batchnorm", "freeze", "integrity", "model", "optim", "stages", "train", "export", "feature_cache")
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SUBSET))
def test_generated_suite_passes_on_cpu(render_project, name):
    project = render_project(name, **SUBSET[name])
    proc = run_tests(project, ["-x", *ON_A_REAL_BACKBONE.get(name, [])])
    assert proc.returncode == 0, failure_report(proc)
    assert " passed" in proc.stdout.splitlines()[-1]


# LoRA on Linears: torchvision's ViT (its MLPs; MultiheadAttention is left out), timm's (attention and MLP),
# and the custom character model under torchrun (test_ddp: the ranks agree, rank 0 alone writes).
LORA_ON_LINEARS = {
    "vit_b_16": {"backbone": "vit_b_16", "checkpoint_formats": ["safetensors", "full"]},
    "timm": {"backbone": "timm", "timm_model": "vit_tiny_patch16_224", "checkpoint_formats": ["state_dict", "full"]},
    "custom": {"backbone": "custom", "checkpoint_formats": ["safetensors", "full"], "features": ["distributed"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LORA_ON_LINEARS))
def test_lora_on_linears_passes_on_cpu(render_project, name):
    """test_lora on each; test_resume and test_ddp on the custom model only. The rest of a ViT-B's suite
    takes tens of minutes on a CPU and checks nothing LoRA-specific that the Conv2d suite above does not,
    and a resume restores adapters on Linears the same way whichever model holds them."""
    answers = {"freeze_by": "lora", "features": [], **LORA_ON_LINEARS[name]}
    project = render_project(f"{name}-lora", **answers)
    tests = ["tests/test_lora.py"] + (["tests/test_resume.py", "tests/test_ddp.py"] if name == "custom" else [])
    proc = run_tests(project, ["-x", *tests])
    assert proc.returncode == 0, failure_report(proc)
    assert " passed" in proc.stdout.splitlines()[-1]


@pytest.mark.slow
def test_the_lora_readme_example_reloads_the_adapter_file_a_run_wrote(render_project):
    """docs/lora.md's Python block, pasted as is after the README's `train --out runs/a`."""
    project = render_project("lora-readme", project_name="lora-readme", freeze_by="lora", features=[])
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "CI": "true"}
    train = [sys.executable, "-m", "lora_readme", "train", "--epochs", "1", "--out", "runs/a", "--device", "cpu"]
    subprocess.run(train, cwd=project, env=env, check=True, capture_output=True)
    block = (project / "docs" / "lora.md").read_text().split("```python\n")[1].split("```")[0]
    # The reloaded model computes what best.pt, the merged weights of the same epoch, computes.
    check = """
import torch
from lora_readme.checkpoint import read_state_dict
from lora_readme.data import example_inputs
from lora_readme.model import build_model
plain = build_model(config)
plain.load_state_dict(read_state_dict("runs/a/best.pt"))
x = example_inputs(config, 4)
with torch.no_grad():
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-4, atol=1e-5)
"""
    proc = subprocess.run([sys.executable, "-c", block + check], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """The failing test's own section first: captured library logs would push it out of a tail."""
    out = proc.stdout
    start = max(out.find("= FAILURES ="), out.find("= ERRORS ="), 0)
    return out[start : start + 6000] + "\n...\n" + out[-1500:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory) -> Path:
    """A venv that sees this interpreter's torch, as a user's environment would."""
    return make_venv(tmp_path_factory.mktemp("venv") / "env")


@pytest.mark.slow
def test_user_flow_resnet18_pattern_with_init(user_venv, render_project, tmp_path):
    """copier copy, pip install -e, `demo train --init`: frozen tensors in best.pt equal the init file's."""
    project = render_project("demo", project_name="demo", backbone="resnet18", freeze_by="pattern")
    pip = [str(user_venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-e", str(project)], check=True, capture_output=True)
    demo = str(user_venv / "bin" / "demo")

    sys.path.insert(0, str(project / "src"))
    try:
        from demo.config import load_config
        from demo.model import build_model
    finally:
        sys.path.remove(str(project / "src"))
    torch.manual_seed(3)
    init = build_model(load_config()).state_dict()
    torch.save(init, tmp_path / "init.pt")

    out = tmp_path / "runs" / "a"
    env = {**os.environ, "CI": "true"}
    run = [
        demo,
        "train",
        "--data",
        "synthetic",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--init",
        str(tmp_path / "init.pt"),
    ]
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "122 of 122 model tensors load (100%)" in proc.stdout and "trainable" in proc.stdout
    for name in ("freeze_manifest.json", "metrics.csv", "best.pt", "last.ckpt", "checkpoints.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "freeze_manifest.json").read_text())
    best = torch.load(out / "best.pt", weights_only=True)
    assert manifest["frozen"]
    for key in manifest["frozen"]:
        assert torch.equal(best[key], init[key]), key
    rows = (out / "metrics.csv").read_text().splitlines()
    # The research default has ema: its columns are there, empty with the average off.
    header = "epoch,train_loss,val_loss,val_acc,lr,seconds,train_acc,images_per_s,trainable_params"
    header += ",val_loss_ema,val_acc_ema"
    assert rows[0] == header and len(rows) == 3

    # lr-find from the same init, beside the run: its curve, and the run left alone.
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    lr_find = [demo, "lr-find", "--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "runs" / "lr")]
    proc = subprocess.run([*lr_find, "--steps", "20", "--end", "1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "lr" / "lr_find.csv").is_file() and (tmp_path / "runs" / "lr" / "lr_find.png").is_file()
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before

    # The console script under torchrun: two gloo processes, rank 0 alone writes.
    ddp = tmp_path / "runs" / "ddp"
    torchrun = [str(user_venv / "bin" / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["train", "--epochs", "1", "--device", "cpu", "--out", str(ddp), "--init", str(tmp_path / "init.pt")]
    proc = subprocess.run([*torchrun, "--no-python", demo, *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 0: train_loss") == 1
    best = torch.load(ddp / "best.pt", weights_only=True)
    for key in manifest["frozen"]:
        assert torch.equal(best[key], init[key]), key


@pytest.mark.slow
def test_user_flow_misspelled_name_fails_before_the_run_folder(user_venv, render_project, tmp_path):
    project = render_project("typo", project_name="typo", freeze_by="name", freeze_names=["stem", "block1"])
    config = tmp_path / "typo.toml"
    config.write_text('[freeze]\nnames = ["stem", "blokc1"]\n')
    sys_python = str(user_venv / "bin" / "python")
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    out = tmp_path / "runs" / "typo"
    proc = subprocess.run(
        [sys_python, "-m", "typo", "--config", str(config), "train", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "'blokc1' matches no module or parameter; closest: block1" in proc.stderr
    assert not out.exists()
