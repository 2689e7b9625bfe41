"""The freeze-integrity check against the epoch it guards: a resnet50 linear probe.

Renders a resnet50 project with no features (freeze_by = backbone: all but
fc frozen, BatchNorm eval_frozen), then in one run:

  a  Integrity.check(): the checksums of every fixed tensor (23.5M frozen
     parameters and the BatchNorm buffers) compared with those taken at the
     freeze, plus the optimizer's set; the median of --checks calls
  b  one training epoch of the same probe on synthetic images, as the run
     itself times it (metrics.csv's `seconds`), which includes one check

Prints both and a / b; writes bench/results/integrity_cost.json.

    python bench/integrity_cost.py [--images 256] [--size 224] [--checks 20]
"""

from __future__ import annotations

import argparse
import csv
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--checks", type=int, default=20)
    args = parser.parse_args()
    root = scratch_dir("integrity-bench-")
    answers = {"project_name": "bench_integrity", "backbone": "resnet50", "features": []}
    project = render(root / "project", answers, src=ROOT)
    sys.path.insert(0, str(project / "src"))
    config_module = importlib.import_module("bench_integrity.config")
    train = importlib.import_module("bench_integrity.train")
    integrity = importlib.import_module("bench_integrity.integrity")
    optim = importlib.import_module("bench_integrity.optim")
    import torch

    config = config_module.load_config()
    config.model.pretrained = False
    config.train.image_size = args.size
    config.data.synthetic_train_size, config.data.synthetic_val_size = args.images, 32
    model, _ = importlib.import_module("bench_integrity.run").prepare_model(config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    optimizer = optim.make_optimizer(model, config, optim.param_groups(model, config, trainable, "trainable"))
    guard = integrity.Integrity(model)
    checks = []
    for _ in range(args.checks):
        started = time.perf_counter()
        guard.check(model, optimizer, "bench")
        checks.append(time.perf_counter() - started)
    out = root / "run"
    train.fit(config, out, epochs=1, device="cpu")
    with open(out / "metrics.csv") as f:
        epoch = float(next(csv.DictReader(f))["seconds"])
    result = {
        "images": args.images,
        "image_size": args.size,
        "fixed_tensors": len(guard.names),
        "fixed_elements": sum(t.numel() for t in integrity.fixed_tensors(model).values()),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "check_seconds": statistics.median(checks),
        "epoch_seconds": epoch,
    }
    result["ratio_check_over_epoch"] = result["check_seconds"] / epoch
    (ROOT / "bench" / "results" / "integrity_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
