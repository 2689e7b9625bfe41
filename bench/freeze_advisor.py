"""plan and suggest against real training, on real images (scikit-learn's handwritten digits).

Renders a resnet18 project (the research default, so it has `plan` and
`suggest`), writes the 1,797 8x8 digits as 32x32 PNG class folders, and:

  plan vs train   pretrains on digits 0-4, then runs `plan` on that data and
                  `train --epochs 2` with every row's printed --set values,
                  each train in its own process. A row's real step is the
                  second epoch's seconds over its batches (validation is 2
                  batches of 25); its real memory is the process's peak RSS.
                  Reported: plan's median step over the real one, and whether
                  plan's memory column orders the rows as the peak RSS does.
  suggest vs truth
                  fine-tunes the pretrained network on two shifted tasks, 50
                  images a class: "input" (digits 0-4, inverted: the same labels,
                  new pixels; the head is kept) and "label" (digits 5-9: new
                  classes on the same kind of pixels; a new head). For each,
                  `suggest --top 1` ranks the blocks, then each single block
                  trains with the head for the same epochs and seeds. Reported:
                  where suggest's first block lands among them by val_acc.

The network is pretrained here (no weights can be downloaded), so "what the
early blocks know" is what 6 epochs on 0-4 taught them.

    pip install -e ".[bench]"   # scikit-learn
    python bench/freeze_advisor.py [--seeds 2] [--epochs 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from scaffold.render import render  # noqa: E402

PACKAGE = "advisorbench"
CONFIG = """
[model]
pretrained = false
[train]
epochs = 2
batch_size = 32
lr = 0.001
image_size = 32
num_workers = 0
cache_features = false
[log]
tensorboard = false
"""


def write_digits(root: Path, classes: list[int], per_class: int | None, invert: bool, seed: int = 0) -> Path:
    """root/train/<digit>/*.png and root/val/<digit>/*.png (25 a class), upscaled to 32x32 RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    for digit in classes:
        indices = [i for i, label in enumerate(digits.target) if label == digit]
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        val, train = order[:25], order[25:][:per_class]
        for split, chosen in (("train", train), ("val", val)):
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).round().clip(0, 255).astype("uint8")
                if invert:
                    pixels = 255 - pixels
                image = Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{i}.png")
    return root


def cli(project: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", PACKAGE, "--config", str(project / "bench.toml"), *args]


def train(project: Path, sets: dict, data: Path, out: Path, init: Path | None = None) -> list[str]:
    options = [part for key, value in sets.items() for part in ("--set", f"{key}={value}")]
    return cli(
        project, *options, "train", "--data", str(data), "--out", str(out), *(["--init", str(init)] if init else [])
    )


def run_rss(command: list[str], project: Path) -> tuple[str, int]:
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "CI": "1"}
    proc = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{shlex.join(command)} failed:\n{err[-3000:]}")
    return out, usage.ru_maxrss * 1024


def metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as file:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file)]


def plan_vs_train(project: Path, data: Path, runs: Path) -> dict:
    out, _ = run_rss(cli(project, "plan", "--data", str(data), "--batches", "8", "--json"), project)
    rows = [row for row in json.loads(out) if row["overrides"]]
    train_images = sum(1 for _ in (data / "train").rglob("*.png"))
    steps = -(-train_images // 32)
    results = []
    for i, row in enumerate(rows):
        sets = [part for value in row["overrides"] for part in ("--set", value)]
        command = cli(project, *sets, "train", "--data", str(data), "--out", str(runs / f"plan{i}"))
        _, rss = run_rss(command, project)
        real = metrics(runs / f"plan{i}")[1]["seconds"] / steps
        results.append(
            {
                "choice": row["choice"],
                "trainable": row["trainable"],
                "plan_step_s": row["step_seconds"],
                "real_step_s": real,
                "plan_over_real": row["step_seconds"] / real,
                "plan_memory_bytes": row["memory_bytes"],
                "real_peak_rss_bytes": rss,
            }
        )
        plan_ms, real_ms = row["step_seconds"] * 1000, real * 1000
        print(f"  {row['choice']:16} plan {plan_ms:6.1f} ms  real {real_ms:6.1f} ms  rss {rss / 2**20:6.0f} MB")
    by_plan = [r["choice"] for r in sorted(results, key=lambda r: r["plan_memory_bytes"])]
    by_rss = [r["choice"] for r in sorted(results, key=lambda r: r["real_peak_rss_bytes"])]
    return {"rows": results, "memory_order_plan": by_plan, "memory_order_rss": by_rss, "same_order": by_plan == by_rss}


def shifted_task(project: Path, name: str, data: Path, init: Path, epochs: int, seeds: int, runs: Path) -> dict:
    out, _ = run_rss(cli(project, "suggest", "--data", str(data), "--init", str(init), "--json"), project)
    answer = json.loads(out)
    blocks = [entry["block"] for entry in answer["ranking"]]
    accuracy = {}
    for block in blocks:
        # The block and the head train: what suggest --top 1 prints for this block.
        selectors = {"stem": ["conv1", "bn1"]}.get(block, [block])
        spec = json.dumps(["!" + s for s in [*selectors, "fc"]])
        scores = []
        for seed in range(seeds):
            out_dir = runs / f"{name}-{block}-{seed}"
            sets = {"freeze.patterns": spec, "train.seed": seed, "train.epochs": epochs}
            run_rss(train(project, sets, data, out_dir, init), project)
            scores.append(max(row["val_acc"] for row in metrics(out_dir)))
        accuracy[block] = sum(scores) / len(scores)
        ratio = answer["ranking"][blocks.index(block)]["ratio"]
        print(f"  {name:5} {block:7} ratio {ratio:.3g}  val_acc {accuracy[block]:.3f}")
    by_accuracy = sorted(blocks, key=lambda b: -accuracy[b])
    return {
        "ranking": answer["ranking"],
        "val_acc": accuracy,
        "suggested": blocks[0],
        "suggested_place_by_val_acc": by_accuracy.index(blocks[0]) + 1,
        "best": by_accuracy[0],
        "suggested_gap_to_best": accuracy[by_accuracy[0]] - accuracy[blocks[0]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    scratch = scratch_dir("freeze-advisor-")
    project = render(
        scratch / PACKAGE,
        {"project_name": PACKAGE, "backbone": "resnet18", "freeze_by": "pattern", "num_classes": 5},
        src=ROOT,
    )
    (project / "bench.toml").write_text(CONFIG)
    base = write_digits(scratch / "digits04", [0, 1, 2, 3, 4], None, invert=False)
    runs = scratch / "runs"
    started = time.perf_counter()
    print("pretrain on digits 0-4, every parameter")
    run_rss(train(project, {"freeze.patterns": "[]", "train.epochs": 6}, base, runs / "pre"), project)
    pre = runs / "pre" / "best.pt"
    backbone = scratch / "backbone.pt"
    state = torch.load(pre, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, backbone)
    print("plan vs train on digits 0-4")
    result = {"plan_vs_train": plan_vs_train(project, base, runs)}
    inverted = write_digits(scratch / "inverted04", [0, 1, 2, 3, 4], 50, invert=True, seed=1)
    new = write_digits(scratch / "digits59", [5, 6, 7, 8, 9], 50, invert=False, seed=1)
    print("suggest vs single-block fine-tunes")
    result["input_shift"] = shifted_task(project, "input", inverted, pre, args.epochs, args.seeds, runs)
    result["label_shift"] = shifted_task(project, "label", new, backbone, args.epochs, args.seeds, runs)
    result.update(
        seconds=time.perf_counter() - started,
        epochs=args.epochs,
        seeds=args.seeds,
        torch=torch.__version__,
        cpus=os.cpu_count(),
        machine=platform.machine(),
    )
    out = ROOT / "bench" / "results" / "freeze_advisor.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
