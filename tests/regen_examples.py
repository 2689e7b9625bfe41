"""Rewrite examples/ from a fresh render: `python -m tests.regen_examples`."""

from __future__ import annotations

import shutil
from pathlib import Path

from scaffold.render import render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    # The teaching edition as `--defaults --data profile=teaching` renders it (with traps), every format.
    "teaching-small-cnn": {
        "project_name": "teaching-small-cnn",
        "profile": "teaching",
        "checkpoint_formats": ["state_dict", "safetensors", "full"],
    },
    # Its student's copy: five lessons left as graded exercises.
    "classroom-small-cnn": {"project_name": "classroom-small-cnn", "profile": "teaching", "exercises": True},
    "linear-probe-small-cnn": {"project_name": "linear-probe-small-cnn"},
    "staged-small-cnn": {
        "project_name": "staged-small-cnn",
        "freeze_by": "name",
        "bn_policy": "eval_all",
        "checkpoint_formats": ["state_dict", "safetensors", "full"],
        "unfreeze_at_epoch": 1,
    },
    "custom-char-model": {"project_name": "custom-char-model", "backbone": "custom", "freeze_by": "name"},
    "resnet18-pattern": {
        "project_name": "resnet18-pattern",
        "backbone": "resnet18",
        "freeze_by": "pattern",
        "bn_policy": "replace_frozen",
        "checkpoint_formats": ["safetensors", "full"],
    },
    # LoRA adapters on resnet18's last two stages, the core only: what freeze_by = lora adds.
    "lora-resnet18": {
        "project_name": "lora-resnet18",
        "backbone": "resnet18",
        "freeze_by": "lora",
        "features": [],
        "checkpoint_formats": ["state_dict", "safetensors", "full"],
    },
}


def normalize_answers(project: Path) -> None:
    # The commit and source path differ per checkout; an example records the
    # template as the repo two levels up, which is where it lives.
    path = project / ".copier-answers.yml"
    lines = [line for line in path.read_text().splitlines() if not line.startswith(("_commit:", "_src_path:"))]
    lines.insert(1, "_src_path: ../..")
    path.write_text("\n".join(lines) + "\n")


def render_example(name: str, dest: Path) -> Path:
    project = render(dest / name, EXAMPLES[name], src=ROOT)
    normalize_answers(project)
    return project


def main() -> None:
    target = ROOT / "examples"
    for name in EXAMPLES:
        shutil.rmtree(target / name, ignore_errors=True)
        render_example(name, target)
        print(f"wrote examples/{name}")


if __name__ == "__main__":
    main()
