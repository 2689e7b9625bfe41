"""predict's throughput against a bare torch.no_grad() loop over the same model and folder.

Renders a resnet18 project, writes a folder of JPEG images, and classifies
it, round after round, two ways (A B A B ...):

  a  the generated project's predict(): a DataLoader over the files (the
     worker count the `predict` command uses), softmax and top-k rows
  b  a bare loop: open, transform and stack each batch in this process,
     run the model under torch.no_grad(), argmax

Both use the weights' own validation transform, the same batch size and
thread count. Prints the medians of images/s and a / b; writes
bench/results/predict_throughput.json.

    python bench/predict_throughput.py [--images 256] [--size 160] [--batch 32] [--rounds 3] [--workers N]
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


def write_images(folder: Path, count: int) -> list[Path]:
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 256, (240, 320, 3), generator=generator, dtype=torch.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels.numpy()).save(path, quality=90)
        paths.append(path)
    return paths


def bare_loop(model, paths, transform, load, batch: int) -> float:
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            inputs = torch.stack([transform(load(str(p))) for p in paths[start : start + batch]])
            model(inputs).argmax(1)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, help="loader workers for (a) (default: what predict picks)")
    args = parser.parse_args()
    root = scratch_dir("predict-bench-")
    project = render(root / "project", {"project_name": "bench_predict", "backbone": "resnet18"}, src=ROOT)
    sys.path.insert(0, str(project / "src"))
    names = ("config", "model", "data", "predict")
    modules = {m: importlib.import_module(f"bench_predict.{m}") for m in names}
    import torch

    config = modules["config"].load_config()
    config.model.pretrained = False
    config.train.image_size = args.size
    model = modules["model"].build_model(config).eval()
    files = modules["predict"].image_files([str(write_images(root / "images", args.images).pop().parent)])
    classes = [f"class_{i}" for i in range(config.model.num_classes)]
    # --workers: the command's own choice for train.num_workers = "auto" unless given.
    workers = args.workers if args.workers is not None else modules["predict"].predict_workers("auto")
    transform = modules["data"].image_transforms(args.size, augment=False)[1]
    rates: dict[str, list[float]] = {"a": [], "b": []}
    cpu = torch.device("cpu")
    for _ in range(args.rounds):
        started = time.perf_counter()
        modules["predict"].predict(model, files, classes, args.size, 1, args.batch, cpu, workers)
        rates["a"].append(len(files) / (time.perf_counter() - started))
        rates["b"].append(bare_loop(model, files, transform, modules["data"].load_rgb, args.batch))
    result = {
        "images": len(files),
        "image_size": args.size,
        "batch": args.batch,
        "workers": workers,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "images_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "all_rounds": rates,
    }
    result["ratio_a_over_b"] = result["images_per_s"]["a"] / result["images_per_s"]["b"]
    out = ROOT / "bench" / "results" / "predict_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
