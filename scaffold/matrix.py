"""The answer matrix of the research edition: a covering set of answer combinations, and running it.

Every pair of values of (backbone, freeze_by, bn_policy, checkpoint_formats,
unfreeze on/off, features) that can occur together occurs in at least one
answer set. `features` takes five values: none (the core alone), traps
alone, the research default and two halves that together hold every item,
so every feature is both on and off beside every value of the other
answers. The teaching edition is its own template (teaching/), with its
own tests (tests/test_teaching_edition.py).
The full product is small enough to enumerate, so the greedy choice below
is exact about which pairs exist; `covered_pairs` lets a test check it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .render import backbone_facts, render

# copier.yml's `features` defaults per profile, in its order.
RESEARCH_FEATURES = (
    "distributed",
    "feature_cache",
    "compile",
    "grad_checkpointing",
    "lr_shaping",
    "amp",
    "export",
    "plot",
    "tensorboard",
    "ema",
    "advisor",
)
# The teaching edition's default, and the one feature it takes.
TEACHING_FEATURES = ("traps",)
# Opt-in in both profiles: each needs a package and a store the user picks.
TRACKERS = ("mlflow", "wandb")
# Every item of copier.yml's `features` choices.
ALL_FEATURES = (*RESEARCH_FEATURES, *TRACKERS, *TEACHING_FEATURES)

DIMENSIONS: dict[str, list[Any]] = {
    "backbone": [
        "small_cnn",
        "resnet18",
        "resnet50",
        "vgg16_bn",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "convnext_tiny",
        "vit_b_16",
        "timm",
        "custom",
    ],
    "freeze_by": ["backbone", "name", "index", "pattern", "none", "lora"],
    "bn_policy": ["train", "eval_frozen", "eval_all", "replace_frozen"],
    "checkpoint_formats": [("state_dict",), ("safetensors",), ("full",), ("state_dict", "safetensors", "full")],
    "unfreeze_at_epoch": [0, 1],
    "features": [
        (),
        TEACHING_FEATURES,
        ("distributed", "compile", "lr_shaping", "plot", "ema", "advisor", "mlflow", "traps"),
        ("feature_cache", "grad_checkpointing", "amp", "export", "tensorboard", "ema", "wandb"),
        RESEARCH_FEATURES,
    ],
}


def without_batchnorm() -> set[str]:
    """Backbones whose copier.yml facts say no BatchNorm (timm's default ViT, custom's
    character model): copier.yml does not ask bn_policy, so only its default occurs."""
    return {b for b in DIMENSIONS["backbone"] if not backbone_facts(b)["has_bn"]}


def is_valid(row: dict[str, Any]) -> bool:
    """The pruning rules, in one place: what copier.yml's validators reject, and unasked questions."""
    if row["backbone"] in without_batchnorm():
        default = "train" if row["freeze_by"] == "none" else "eval_frozen"
        if row["bn_policy"] != default:
            return False
    if row["freeze_by"] == "none":
        # Nothing frozen: no BN inside frozen parts, nothing to unfreeze.
        return row["bn_policy"] in ("train", "eval_all") and row["unfreeze_at_epoch"] == 0
    if row["freeze_by"] == "lora":
        # unfreeze_at_epoch is not asked: the base stays frozen.
        return row["unfreeze_at_epoch"] == 0
    return True


def _pairs(row: dict[str, Any]) -> set[tuple]:
    items = sorted(row.items())
    return set(itertools.combinations(items, 2))


def all_rows() -> list[dict[str, Any]]:
    names = list(DIMENSIONS)
    rows = (dict(zip(names, values, strict=True)) for values in itertools.product(*DIMENSIONS.values()))
    return [row for row in rows if is_valid(row)]


def answer_sets() -> list[dict[str, Any]]:
    """Greedy pairwise cover: each step takes the valid row covering most new pairs."""
    rows = all_rows()
    uncovered = set().union(*(_pairs(row) for row in rows))
    chosen = []
    while uncovered:
        best = max(rows, key=lambda row: len(_pairs(row) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def covered_pairs(sets: list[dict[str, Any]]) -> set[tuple]:
    return set().union(*(_pairs(row) for row in sets))


def answers(row: dict[str, Any]) -> dict[str, Any]:
    """Copier data for one matrix row of the research edition.

    The research default's features are left unasked, so copier.yml's
    default is rendered too.
    """
    data = {**row, "checkpoint_formats": list(row["checkpoint_formats"]), "features": list(row["features"])}
    if row["freeze_by"] in ("none", "lora"):
        del data["unfreeze_at_epoch"]
    if row["features"] == RESEARCH_FEATURES:
        del data["features"]
    return data


def label(row: dict[str, Any]) -> str:
    formats = "+".join(row["checkpoint_formats"])
    unfreeze = f"-unfreeze{row['unfreeze_at_epoch']}" if row["unfreeze_at_epoch"] else ""
    named = {(): "core", TEACHING_FEATURES: "traps", RESEARCH_FEATURES: "research"}
    features = named.get(row["features"]) or row["features"][0] + "-half"
    return f"{row['backbone']}-{row['freeze_by']}-{row['bn_policy']}-{formats}{unfreeze}-{features}"


@dataclass
class Result:
    label: str
    passed: bool
    seconds: float
    summary: str


def run_tests(project: Path, extra_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """The generated project's own pytest suite, in a fresh interpreter."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        # -m "": the slow tests too, which a project's default run leaves out.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *(extra_args or [])],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )


def run_matrix(workdir: Path | None = None, limit: int | None = None, render_only: bool = False) -> list[Result]:
    sets = answer_sets()[:limit]
    root = Path(workdir or tempfile.mkdtemp(prefix="freeze-matrix-"))
    results = []
    for i, row in enumerate(sets):
        name = label(row)
        started = time.perf_counter()
        project = render(root / f"{i:02d}-{name}", answers(row))
        if render_only:
            results.append(Result(name, True, time.perf_counter() - started, "rendered"))
        else:
            proc = run_tests(project)
            last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            results.append(Result(name, proc.returncode == 0, time.perf_counter() - started, last))
        print(f"[{i + 1}/{len(sets)}] {'ok  ' if results[-1].passed else 'FAIL'} {name}", flush=True)
    return results


def format_results(results: list[Result]) -> str:
    width = max(len(r.label) for r in results)
    lines = [f"{'answers'.ljust(width)}  result  seconds  pytest"]
    for r in results:
        lines.append(f"{r.label.ljust(width)}  {'pass' if r.passed else 'FAIL'}    {r.seconds:7.1f}  {r.summary}")
    passed = sum(r.passed for r in results)
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)
