"""The up-front image check against one epoch's data loading, on the same folder.

Renders a resnet18 project and writes a folder of JPEG images (smooth
320x240 pictures, about the size and compression of a photo dataset's
thumbnails), then, round after round:

  a  checked_folder(): the generated project's scan of the folder, every
     file decoded once at the smallest scale its format allows
  b  one epoch of data loading: a DataLoader over the same dataset with the
     train transforms (RandomResizedCrop to image_size, flip, normalize) and
     the worker count `train` picks for num_workers = "auto"
  c  for scale, the header-only Image.verify() over the same files, which
     lets truncated and corrupt files through

Prints the medians in seconds and a / b; writes bench/results/image_check.json.

    python bench/image_check.py [--images 20000] [--size 224] [--batch 64] [--rounds 1]
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


def write_images(folder: Path, count: int, classes: int) -> None:
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.randint(0, 256, (6, 8, 3), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(coarse.numpy()).resize((320, 240), Image.Resampling.BICUBIC)
        target = folder / f"class{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{i:05d}.jpg", quality=90)


def verify_only(samples: list[tuple[str, int]]) -> None:
    from PIL import Image

    for path, _ in samples:
        with Image.open(path) as image:
            image.verify()


def one_epoch(dataset, batch: int, workers: int) -> int:
    from torch.utils.data import DataLoader

    seen = 0
    for inputs, _ in DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers):
        seen += len(inputs)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    root = scratch_dir("image-check-bench-")
    project = render(root / "project", {"project_name": "bench_images", "backbone": "resnet18"}, src=ROOT)
    sys.path.insert(0, str(project / "src"))
    data = importlib.import_module("bench_images.data")
    run = importlib.import_module("bench_images.run")
    import torch

    folder = root / "images"
    started = time.perf_counter()
    write_images(folder, args.images, 10)
    print(f"wrote {args.images} images in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    transform = data.image_transforms(args.size, augment=True)[0]
    # The research render takes the process group too: one process here.
    world = importlib.import_module("bench_images.distributed").SINGLE
    workers = run.loader_workers("auto", str(folder), world)
    seconds: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        dataset = data.checked_folder(folder, transform, "error")
        seconds["a"].append(time.perf_counter() - started)
        started = time.perf_counter()
        assert one_epoch(dataset, args.batch, workers) == args.images
        seconds["b"].append(time.perf_counter() - started)
        started = time.perf_counter()
        verify_only(dataset.samples)
        seconds["c"].append(time.perf_counter() - started)
    result = {
        "images": args.images,
        "image_size": args.size,
        "batch": args.batch,
        "workers": workers,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "all_rounds": seconds,
    }
    result["ratio_a_over_b"] = result["seconds"]["a"] / result["seconds"]["b"]
    result["ratio_c_over_b"] = result["seconds"]["c"] / result["seconds"]["b"]
    out = ROOT / "bench" / "results" / "image_check.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
