"""Whole epochs of a linear probe, and step time against frozen depth.

Every measurement runs in a fresh process, on the same model (resnet18, then
resnet50, each from its own render), synthetic data, batch size and thread
count:

  e  Lightning's BackboneFinetuning (backbone frozen for the whole run), the
     same model, data, batch, optimizer and validation, through lightning.Trainer
  a  the generated project's fit(), feature cache off
  f  the generated project's fit(), feature cache on (what "auto" picks here)
  g  one step of the generated loop with the stem, then each further stage,
     frozen: stem, +layer1, ..., +layer4 (a PNG plot)

    python bench/linear_probe.py [--models resnet18,resnet50] [--size 128] [--batch 32] [--train 256]
                                 [--val 128] [--epochs 4] [--steps 7] [--project DIR]
                                 [--out bench/results/linear_probe.json]

Epoch times are medians over the epochs after the first (the cache is
built in the first). Lightning is a bench-only dependency: pip install lightning.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from frozen_step import load_project  # noqa: E402 - the sibling script, not a package

DEPTHS = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
DEPTH_LABELS = ["stem", "+layer1", "+layer2", "+layer3", "+layer4"]


def probe_config(modules, args) -> dict:
    config = modules["config"].load_config()
    config.model.pretrained = False
    vars(config.train).update(batch_size=args.batch, image_size=args.size, epochs=args.epochs)
    vars(config.data).update(synthetic_train_size=args.train, synthetic_val_size=args.val)
    return config


def run_fit(project: Path, args, cache: bool) -> dict:
    modules = load_project(project)
    config = probe_config(modules, args)
    config.freeze.patterns = ["!fc"]  # a linear probe: everything but the head
    config.unfreeze.stages = []
    config.train.cache_features = cache
    with tempfile.TemporaryDirectory() as out:
        history = modules["train"].fit(config, out, device="cpu")
    seconds = [row["seconds"] for row in history]
    return {"epoch_seconds": seconds, "median_after_first": statistics.median(seconds[1:])}


def run_lightning(project: Path, args) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import BackboneFinetuning
    from torch import nn
    from torch.utils.data import DataLoader

    modules = load_project(project)
    config = probe_config(modules, args)
    torch.manual_seed(config.train.seed)
    model = modules["model"].build_model(config)

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head, model.fc = model.fc, nn.Identity()
            self.backbone = model  # the attribute BackboneFinetuning freezes

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, _):
            images, labels = batch
            return nn.functional.cross_entropy(self(images), labels)

        def validation_step(self, batch, _):
            images, labels = batch
            logits = self(images)
            self.log("val_loss", nn.functional.cross_entropy(logits, labels))
            self.log("val_acc", (logits.argmax(1) == labels).float().mean())

        def configure_optimizers(self):
            trainable = [p for p in self.parameters() if p.requires_grad]
            train_cfg = config.train
            return torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.starts, self.ends = [], []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.starts.append(time.perf_counter())
            self.ends.append(self.starts[-1])

        def on_train_epoch_end(self, trainer, module) -> None:
            self.ends[-1] = max(self.ends[-1], time.perf_counter())

        def on_validation_epoch_end(self, trainer, module) -> None:
            if self.ends:
                self.ends[-1] = max(self.ends[-1], time.perf_counter())

    train_set, val_set = modules["data"].make_datasets("synthetic", config)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=10**6), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        Probe(),
        DataLoader(train_set, batch_size=args.batch, shuffle=True),
        DataLoader(val_set, batch_size=args.batch),
    )
    seconds = [end - start for start, end in zip(timer.starts, timer.ends, strict=True)]
    return {"epoch_seconds": seconds, "median_after_first": statistics.median(seconds[1:]), "lightning": L.__version__}


def run_depth(project: Path, args, depth: int) -> dict:
    import torch

    modules = load_project(project)
    config = probe_config(modules, args)
    config.freeze.patterns = [f"{name}.*" for stage in DEPTHS[: depth + 1] for name in stage]
    config.unfreeze.stages = []
    train = modules["train"]
    torch.manual_seed(0)
    model, _ = modules["run"].prepare_model(config)
    optimizer = modules["optim"].make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, config.model.num_classes, (args.batch,))
    times = []
    for i in range(3 + args.steps):
        started = time.perf_counter()
        train.train_one_epoch(model, [(images, labels)], optimizer, scaler, torch.device("cpu"), None)
        if i >= 3:  # after warm-up
            times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times)}


def plot(by_model: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=120)
    axes = figure.add_subplot()
    top = 1.05
    for model_name, report in by_model.items():
        ratios = list(report["ratios"]["frozen depth / full step"].values())
        axes.plot(DEPTH_LABELS, ratios, marker="o", label=model_name)
        top = max(top, max(ratios) * 1.1)
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_ylim(0, top)
    axes.set_xlabel("frozen")
    axes.set_ylabel("step time / full fine-tune step")
    axes.set_title("A deeper frozen prefix: a cheaper step")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def bench_model(project: Path, options: list[str]) -> dict:
    """Every comparison on one rendered project, each in a fresh process."""

    def one(kind: str) -> dict:
        command = [sys.executable, __file__, "--one", kind, "--project", str(project), *options]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = {"e": one("lightning"), "a": one("fit:off"), "f": one("fit:on")}
    depths = [one(f"depth:{d}") for d in range(len(DEPTHS))]
    full = one("depth:-1")  # an empty pattern list: nothing frozen
    ratios = {
        "e/a epoch": results["e"]["median_after_first"] / results["a"]["median_after_first"],
        "e/f epoch": results["e"]["median_after_first"] / results["f"]["median_after_first"],
        "a/f epoch (uncached / cached)": results["a"]["median_after_first"] / results["f"]["median_after_first"],
        "frozen depth / full step": {
            label: d["seconds"] / full["seconds"] for label, d in zip(DEPTH_LABELS, depths, strict=True)
        },
    }
    return {"results": {**results, "g": depths, "full_step": full}, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--val", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument(
        "--project", type=Path, help="a rendered pattern/eval_frozen project of the one model in --models"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "linear_probe.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, _, arg = args.one.partition(":")
        if kind == "fit":
            result = run_fit(args.project, args, cache=arg == "on")
        elif kind == "lightning":
            result = run_lightning(args.project, args)
        else:
            result = run_depth(args.project, args, int(arg))
        print(json.dumps(result))
        return

    models = args.models.split(",")
    if args.project and len(models) != 1:
        parser.error("--project is one model's render: give --models that model alone")
    import torch

    options = ["--size", str(args.size), "--batch", str(args.batch), "--train", str(args.train)]
    options += ["--val", str(args.val), "--epochs", str(args.epochs), "--steps", str(args.steps)]
    by_model = {}
    for model_name in models:
        project = args.project
        if project is None:
            sys.path.insert(0, str(ROOT))
            from bench.scratch import scratch_dir
            from scaffold.render import render

            answers = {"backbone": model_name, "freeze_by": "pattern", "bn_policy": "eval_frozen"}
            project = render(scratch_dir("bench-") / "p", answers)
        by_model[model_name] = bench_model(project, options)

    device = f"CPU ({torch.get_num_threads()} threads)"
    report = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": args.size,
        "batch": args.batch,
        "train": args.train,
        "val": args.val,
        "epochs": args.epochs,
        "models": by_model,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(by_model, args.out.with_name("frozen_depth.png"))
    print(f"{device}, torch {torch.__version__}, batch {args.batch} at {args.size}x{args.size}")
    labels = {"e": "Lightning BackboneFinetuning", "a": "generated, cache off", "f": "generated, cache on"}
    for model_name, result in by_model.items():
        for key, label in labels.items():
            median = result["results"][key]["median_after_first"]
            print(f"{model_name:<9} {key} {label:<32} median epoch {median:.3f} s")
        for key, value in result["ratios"].items():
            print(f"{model_name:<9} {key}: {value if isinstance(value, dict) else round(value, 2)}")


if __name__ == "__main__":
    main()
