"""The EMA of what trains against timm's ModelEmaV3, on a linear probe and on a full fine-tune.

Renders a resnet18 project with the ema feature, then in one run, for each
of two setups of the same model:

  probe  the rendered linear probe (all but fc frozen, BatchNorm eval_frozen)
  full   every parameter trainable, BatchNorm training

it times, round after round and interleaved so that drift hits all alike:

  none   one training step (forward, backward, SGD step) with no average
  ours   the same step followed by the project's EMA.update()
  timm   the same step followed by ModelEmaV3.update(model)

and reports the median step, the median of each update alone, each
average's overhead per step (its update over none's step: subtracting two
step medians would measure the noise of a 2-core machine instead), and the
bytes each average holds.

    python bench/ema_cost.py [--size 128] [--batch 16] [--rounds 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from scaffold.render import render  # noqa: E402


def setups(modules, config):
    """The probe as the project freezes it, and the same network with everything training."""
    probe, _ = modules["run"].prepare_model(config)
    full = modules["model"].build_model(config)
    full.train()
    return {"probe": probe, "full": full}


def timed_step(torch, model, optimizer, images, labels, average) -> tuple[float, float]:
    """Seconds of one training step with `average` (or none) after it, and of the update alone."""
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    before = time.perf_counter()
    if average is not None:
        average()
    done = time.perf_counter()
    return done - started, done - before


def measure(torch, modules, model, args) -> dict:
    from timm.utils import ModelEmaV3

    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)
    ours = modules["ema"].EMA(model, 0.999, warmup=False)
    theirs = ModelEmaV3(model, decay=0.999)
    variants = {"none": None, "ours": ours.update, "timm": lambda: theirs.update(model)}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    updates: dict[str, list[float]] = {name: [] for name in variants}
    timed_step(torch, model, optimizer, images, labels, None)  # warm-up
    for _ in range(args.rounds):
        for name, average in variants.items():
            for _ in range(args.steps):
                step, update = timed_step(torch, model, optimizer, images, labels, average)
                steps[name].append(step)
                updates[name].append(update)
    median = {name: statistics.median(values) for name, values in steps.items()}
    update = {name: statistics.median(updates[name]) for name in ("ours", "timm")}
    held = {
        "ours": sum(t.numel() * t.element_size() for t in ours.shadow.values()),
        "timm": sum(t.numel() * t.element_size() for t in theirs.module.state_dict().values()),
    }
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "params": sum(p.numel() for p in model.parameters()),
        "step_seconds": median,
        "update_seconds": update,
        "overhead_per_step": {name: update[name] / median["none"] for name in ("ours", "timm")},
        "bytes_held": held,
        "ratio_update_ours_over_timm": update["ours"] / update["timm"],
        "ratio_bytes_ours_over_timm": held["ours"] / held["timm"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    root = scratch_dir("ema-bench-")
    answers = {"project_name": "bench_ema", "backbone": "resnet18", "features": ["ema"]}
    project = render(root / "project", answers, src=ROOT)
    sys.path.insert(0, str(project / "src"))
    modules = {name: importlib.import_module(f"bench_ema.{name}") for name in ("config", "ema", "model", "run")}
    import torch

    config = modules["config"].load_config()
    config.model.pretrained = False
    torch.manual_seed(0)
    result = {
        "model": "resnet18",
        "image_size": args.size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    for name, model in setups(modules, config).items():
        result[name] = measure(torch, modules, model, args)
    (ROOT / "bench" / "results" / "ema_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
