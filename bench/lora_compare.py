"""Linear probe, partial freeze, LoRA and full fine-tune, side by side on resnet18 and vit_b_16.

Renders one freeze_by=lora project per backbone and trains four setups of
the same network, each in a process of its own (so each peak memory is its
own), on the same synthetic data, from the same random base:

  probe    the head alone (lora.target = [])
  partial  the head and the last stage (resnet18 layer4; vit_b_16 its last
           two encoder layers and the final LayerNorm)
  lora     the rendered default: adapters on the [lora] target, and the head
  full     every parameter, BatchNorm training

For each it reports the trainable parameters, the median training step
(forward, backward, AdamW step), the peak memory of training (CUDA: the
allocator's peak; CPU: the growth of the process's peak RSS over the built
model, which counts gradients, optimizer state and activations) and the
validation accuracy after the same steps. The base is random (no weights
can be downloaded here), so accuracy compares what each setup can fit in
the same steps, not what it transfers.

    python bench/lora_compare.py [--steps 40] [--batch 16] [--size 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from scaffold.render import render  # noqa: E402

BACKBONES = ("resnet18", "vit_b_16")
SETUPS = ("probe", "partial", "lora", "full")
LAST_STAGE = {
    "resnet18": ["layer4"],
    "vit_b_16": ["encoder.layers.encoder_layer_10", "encoder.layers.encoder_layer_11", "encoder.ln"],
}
LR = {"probe": 1e-2, "partial": 1e-3, "lora": 1e-3, "full": 1e-3}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(modules, config, backbone: str, setup: str):
    """The model of one setup, built as the project builds it (seeded: the same base for all four)."""
    config.unfreeze.stages = []
    if setup in ("probe", "partial"):
        config.lora.target = []
    if setup == "partial":
        config.freeze.keep_trainable = [config.freeze.keep_trainable[0], *LAST_STAGE[backbone]]
    modules["rng"].seed_everything(0)
    if setup == "full":
        return modules["model"].build_model(config)
    model, _ = modules["run"].prepare_model(config)
    return model


def one(args) -> dict:
    """Train one setup in this process and measure it."""
    project = Path(args.project)
    sys.path.insert(0, str(project / "src"))
    package = project.name
    modules = {n: importlib.import_module(f"{package}.{n}") for n in ("config", "data", "model", "optim", "rng", "run")}
    import torch

    device = torch.device(args.device)
    config = modules["config"].load_config()
    config.model.pretrained = False
    config.train.image_size = args.size
    config.train.lr = LR[args.setup]
    train_set, val_set = modules["data"].synthetic_datasets(10, args.size, args.steps * args.batch, 256)
    model = build(modules, config, args.backbone, args.setup).to(device)
    optimizer = modules["optim"].make_optimizer(model, config)
    order = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(train_set, args.batch, shuffle=True, generator=order)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    else:
        before = peak_rss_bytes()
    model.train()
    steps = []
    for images, labels in loader:
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val_set, 64):
            correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_params": trainable,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_fraction": trainable / sum(p.numel() for p in model.parameters()),
        "step_seconds": statistics.median(steps[2:]),  # the first steps warm the allocator up
        "peak_training_bytes": peak - before if device.type != "cuda" else peak,
        "val_acc": correct / len(val_set),
        "final_train_loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=3, metavar=("PROJECT", "BACKBONE", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.project, args.backbone, args.setup = args.one
        print(json.dumps(one(args)))
        return
    import torch

    root = scratch_dir("lora-bench-")
    result = {
        "steps": args.steps,
        "batch": args.batch,
        "image_size": args.size,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    for backbone in BACKBONES:
        answers = {"project_name": f"lora_{backbone}", "backbone": backbone, "freeze_by": "lora", "features": []}
        project = render(root / f"lora_{backbone}", answers, src=ROOT)
        result[backbone] = {}
        for setup in SETUPS:
            command = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch)]
            command += ["--size", str(args.size), "--device", args.device, "--one", str(project), backbone, setup]
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            result[backbone][setup] = json.loads(proc.stdout.splitlines()[-1])
            print(backbone, setup, result[backbone][setup], flush=True)
        full = result[backbone]["full"]
        for setup in SETUPS[:-1]:
            row = result[backbone][setup]
            row["memory_vs_full"] = row["peak_training_bytes"] / full["peak_training_bytes"]
            row["step_vs_full"] = row["step_seconds"] / full["step_seconds"]
    name = "lora_compare.json" if args.device == "cpu" else f"lora_compare_{args.device.split(':')[0]}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
