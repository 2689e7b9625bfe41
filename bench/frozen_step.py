"""What a training step costs with a frozen backbone, next to the alternatives users reach for.

Each variant runs in a fresh process (so peak memory is its own), on the
same model, batch and thread count, and the table reports ratios:

  a  the generated project's loop (prepare_model + make_optimizer +
     train_one_epoch), everything but the head frozen, BN fixed
  b  the physical limit: the backbone under no_grad, then a head step
  c  the seed articles' "method 4": every parameter trainable and in the
     optimizer, backbone grads zeroed after backward
  d  full fine-tune

    python bench/frozen_step.py [--models resnet18,resnet50] [--size 128] [--batch 32]
                                [--steps 7] [--project DIR] [--out bench/results/frozen_step.json]

The generated code comes from a resnet18 render (`--project` takes one made
elsewhere, e.g. on a GPU machine without Copier); for resnet50 its ARCH is
switched, the rest of the code is the same. Every variant runs at the
precision and memory layout the generated project picks for the device
(its amp_dtype and use_channels_last with the default config): on CUDA,
bf16 autocast where the GPU has it (else fp16 with a GradScaler) and
channels_last; on the CPU, fp32 and NCHW. Memory is
torch.cuda.max_memory_allocated on CUDA; on the CPU it is the growth of the
peak RSS over the RSS before the first step.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "a": "generated loop, frozen backbone",
    "b": "no_grad backbone + head step",
    "c": "seeds' method 4 (zero backbone grads)",
    "d": "full fine-tune",
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def load_project(project: Path) -> dict:
    """The rendered project's modules, imported from its src/ folder."""
    sys.path.insert(0, str(project / "src"))
    package = next(p.name for p in (project / "src").iterdir() if (p / "train.py").is_file())
    return {m: importlib.import_module(f"{package}.{m}") for m in ("train", "run", "optim", "config", "data", "model")}


def measure(project: Path, model_name: str, variant: str, size: int, batch: int, steps: int) -> dict:
    """One variant, in this process: median step seconds and peak memory in MiB."""
    import torch
    from torch import nn

    modules = load_project(project)
    model_mod, train, config_mod = modules["model"], modules["train"], modules["config"]
    model_mod.ARCH = model_name
    config = config_mod.load_config()
    config.model.pretrained = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = modules["run"].amp_dtype(config.train, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    if variant == "a":
        model, _ = modules["run"].prepare_model(config)
    else:
        model = model_mod.build_model(config)
    channels_last = modules["run"].use_channels_last(config.train.channels_last, model, dev)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(dev, memory_format=layout)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=dev).to(memory_format=layout)
    labels = torch.randint(0, config.model.num_classes, (batch,), device=dev)

    if variant == "a":
        optimizer = modules["optim"].make_optimizer(model, config)

        def step() -> None:
            train.train_one_epoch(model, [(images, labels)], optimizer, scaler, dev, amp, channels_last=channels_last)

    else:
        head = model.fc
        if variant == "b":
            model.fc = nn.Identity()
            model.eval()
            optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
        else:
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        backbone = [p for name, p in model.named_parameters() if not name.startswith("fc.")]

        def step() -> None:
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                if variant == "b":
                    with torch.no_grad():
                        features = model(images)
                    logits = head(features)
                else:
                    logits = model(images)
                loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if variant == "c":
                for p in backbone:
                    p.grad.zero_()
            scaler.step(optimizer)
            scaler.update()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base = rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # warm-up: allocator, autotuning, optimizer state
        step()
    times = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    if dev.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "images_per_s": batch / seconds,
        "memory_mib": memory,
        "autocast": str(amp).removeprefix("torch.") if amp else "off",
        "channels_last": channels_last,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--project", type=Path, help="a rendered resnet18 project (default: render one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frozen_step.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        result = measure(args.project, args.one[0], args.one[1], args.size, args.batch, args.steps)
        print(json.dumps(result))
        return

    import torch

    project = args.project
    if project is None:
        sys.path.insert(0, str(ROOT))
        from bench.scratch import scratch_dir
        from scaffold.render import render

        project = render(scratch_dir("bench-") / "p", {"backbone": "resnet18"})
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    results: dict[str, dict] = {}
    for model_name in args.models.split(","):
        results[model_name] = {}
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--one", model_name, variant, "--project", str(project)]
            command += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)]
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            results[model_name][variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = {}
    for model_name, r in results.items():
        ratios[model_name] = {
            "a/b time": r["a"]["seconds"] / r["b"]["seconds"],
            "c/a time": r["c"]["seconds"] / r["a"]["seconds"],
            "d/a time": r["d"]["seconds"] / r["a"]["seconds"],
            "a/d memory": r["a"]["memory_mib"] / r["d"]["memory_mib"],
        }
    report = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        # What the generated project picked on this device (the same for every variant).
        "autocast": next(iter(results.values()))["a"]["autocast"],
        "channels_last": next(iter(results.values()))["a"]["channels_last"],
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "results": results,
        "ratios": ratios,
    }
    print(f"{device}, torch {torch.__version__}, batch {args.batch} at {args.size}x{args.size}", end=", ")
    print(f"autocast {report['autocast']}, channels_last {report['channels_last']}")
    print(f"{'model':<10} {'variant':<40} {'ms/step':>9} {'images/s':>9} {'MiB':>8}")
    for model_name, r in results.items():
        for variant, label in VARIANTS.items():
            v = r[variant]
            figures = f"{v['seconds'] * 1e3:9.1f} {v['images_per_s']:9.0f} {v['memory_mib']:8.0f}"
            print(f"{model_name:<10} {variant + ' ' + label:<40} {figures}")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios[model_name].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
