"""Training: fit() wires model, freeze, data and checkpoints together.

Read top to bottom: prepare_model (build, load --init, freeze, fix BN),
make_optimizer (trainable parameters only), train_one_epoch, evaluate, fit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .batchnorm import fix_batchnorm
from .checkpoint import RunFiles, atomic_write, config_hash, load_resume, safetensors_bytes, torch_bytes
from .config import ConfigError
from .data import make_datasets
from .freeze import freeze
from .layers import freeze_summary
from .model import build_model
from .weights import load_init

try:
    import numpy as np
except ImportError:  # torch runs without numpy; then there is no numpy RNG to seed or keep
    np = None

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds")
# Metrics best.* can be chosen by; checkpoint.mode says whether more is better.
MONITORS = ("val_acc", "val_loss", "train_loss")
BN_POLICY = "eval_all"


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if np is not None:
        np.random.seed(seed)


def prepare_model(
    config: dict, init: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model, load --init, apply the freeze spec and BN policy.

    Raises before anything is written when the spec or the init file is wrong.
    """
    model = build_model(config["model"]["num_classes"])
    if init is not None:
        load_init(model, init, config["init"])
    selection = freeze(model, config["freeze"]["names"])
    bn_fixed = fix_batchnorm(model)
    selectors = {selector: len(names) for selector, names in selection.items()}
    return model, freeze_manifest(model, selectors, bn_fixed)


def freeze_manifest(model: nn.Module, selectors: dict[str, int], bn_fixed: list[str]) -> dict[str, Any]:
    """What is frozen, as written to freeze_manifest.json.

    `selectors` maps each selector of the spec to the number of parameter
    tensors it froze.
    """
    params = list(model.named_parameters())
    return {
        "frozen": [name for name, p in params if not p.requires_grad],
        "trainable": [name for name, p in params if p.requires_grad],
        "bn_fixed": bn_fixed,
        "bn_policy": BN_POLICY,
        "selectors": selectors,
    }


def make_optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    # Only trainable parameters: a frozen tensor inside the optimizer still
    # drifts through weight decay and momentum even with requires_grad=False.
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_cfg = config["train"]
    return torch.optim.AdamW(
        [{"params": trainable, "name": "trainable"}],
        lr=train_cfg["lr"],
        weight_decay=train_cfg["weight_decay"],
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unfreeze(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    lr_mult: float,
) -> list[str]:
    """Make every frozen parameter trainable, in a param group of its own.

    The group must join both the optimizer (add_param_group) and the
    schedule: LambdaLR keeps one base_lr and one factor per group, and a
    group it does not know about would keep its first lr for ever.
    """
    names = [name for name, p in model.named_parameters() if not p.requires_grad]
    params = [p for p in model.parameters() if not p.requires_grad]
    for param in params:
        param.requires_grad_(True)
    base_lr = optimizer.param_groups[0]["initial_lr"] * lr_mult
    factor = scheduler.lr_lambdas[0]
    optimizer.add_param_group(
        {"params": params, "name": "unfrozen", "lr": base_lr * factor(scheduler.last_epoch), "initial_lr": base_lr}
    )
    scheduler.base_lrs.append(base_lr)
    scheduler.lr_lambdas.append(factor)
    return names


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    use_amp: bool,
) -> float:
    model.train()
    total, count = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        # The scaler keeps fp16 gradients from underflowing; disabled it is a no-op.
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over `loader`."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return loss / count, correct / count


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    # Rewritten whole from the history each epoch, so a resumed run never
    # holds rows from epochs it went back over.
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as data weights_only=True loads."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": None,
    }
    if np is not None:
        # The Generator-style dict of numpy's global RNG, its key as a tensor:
        # a numpy array would need unsafe globals to unpickle.
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
        state["numpy"] = numpy_state
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["numpy"] is not None and np is not None:
        numpy_state = dict(state["numpy"])
        numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}
        np.random.set_state(numpy_state)


def fit(
    config: dict,
    out: str | Path | None,
    *,
    data: str = "synthetic",
    epochs: int | None = None,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    device: str | None = None,
) -> list[dict[str, float]]:
    """Train and write the run folder; return one metrics row per epoch.

    `stop_after` ends this invocation after that many epochs, leaving the
    schedule planned for `epochs`: resume later with --resume.
    `resume` is a full checkpoint or a run folder (its newest checkpoint that
    matches checkpoints.json); `out` then defaults to that checkpoint's folder.
    """
    train_cfg = config["train"]
    epochs = epochs or train_cfg["epochs"]
    dev = pick_device(device)
    seed_everything(train_cfg["seed"])
    # Everything that can reject the input runs before the run folder exists.
    monitor, mode = config["checkpoint"]["monitor"], config["checkpoint"]["mode"]
    if monitor not in MONITORS or mode not in ("min", "max"):
        raise ConfigError(
            f"checkpoint.monitor must be one of {', '.join(MONITORS)} and checkpoint.mode min or max; "
            f"got {monitor!r}, {mode!r}"
        )
    keep_last_k = config["checkpoint"]["keep_last_k"]
    if keep_last_k < 0:
        raise ConfigError(f"checkpoint.keep_last_k must be 0 or more, got {keep_last_k}")
    checkpoint = None
    if resume is not None:
        resume, checkpoint = load_resume(resume)
        out = out or resume.parent
    if out is None:
        raise ConfigError("no run folder: pass --out or --resume")
    model, manifest = prepare_model(
        config,
        init=init,
    )
    train_set, val_set = make_datasets(data, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = RunFiles(out)
    print(freeze_summary(model, BN_POLICY))

    model.to(dev)
    optimizer = make_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, epochs)
    use_amp = train_cfg["amp"] and dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp)
    history: list[dict[str, float]] = []
    start = 0
    best_value = math.inf if mode == "min" else -math.inf
    unfreeze_at = config["freeze"]["unfreeze_at_epoch"]
    unfrozen = False
    if checkpoint is not None:
        # Re-apply the unfreeze before loading the optimizer: its state has
        # two param groups, and the backbone must keep training after resume.
        if checkpoint["unfrozen"]:
            unfreeze(model, optimizer, scheduler, config["freeze"]["unfreeze_lr_mult"])
            unfrozen = True
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start, history = checkpoint["epoch"] + 1, checkpoint["history"]
        best_value = checkpoint["best_value"]
        manifest = checkpoint["freeze_manifest"]
        print(f"resumed from {resume} after epoch {start - 1}")
        if start >= epochs and resume.name != "last.ckpt" and resume.resolve().parent == out.resolve():
            # Killed during the final save: the newest valid file is an
            # epoch file, and last.ckpt must not stay behind it.
            files.save("last.ckpt", resume.read_bytes(), full_info(checkpoint))
    write_json(out / "freeze_manifest.json", manifest)

    loader_args = {
        "batch_size": train_cfg["batch_size"],
        "num_workers": train_cfg["num_workers"],
        "pin_memory": dev.type == "cuda",
    }
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    ran = 0
    for epoch in range(start, epochs):
        if epoch >= unfreeze_at and not unfrozen:
            names = unfreeze(model, optimizer, scheduler, config["freeze"]["unfreeze_lr_mult"])
            unfrozen = True
            manifest = freeze_manifest(model, manifest["selectors"], manifest["bn_fixed"])
            write_json(out / "freeze_manifest.json", manifest)
            print(f"epoch {epoch}: unfroze {len(names)} tensors into param group 'unfrozen'")
        # The shuffle order depends on the seed and the epoch alone (this is
        # the sampler's state), so a resumed run sees exactly the batches an
        # uninterrupted one would.
        shuffle = torch.Generator().manual_seed(train_cfg["seed"] + epoch)
        train_loader = DataLoader(train_set, shuffle=True, generator=shuffle, **loader_args)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(model, train_loader, optimizer, scaler, dev, use_amp)
        val_loss, val_acc = evaluate(model, val_loader, dev)
        scheduler.step()
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        write_metrics(out / "metrics.csv", history)
        print(
            f"epoch {epoch}: train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.3f} lr {lr:.2e} ({row['seconds']:.1f}s)"
        )
        value = row[monitor]
        if value < best_value if mode == "min" else value > best_value:
            best_value = value
            info = {"epoch": epoch, "metric": {monitor: value}}
            state = model.state_dict()
            files.save("best.pt", torch_bytes(state), {**info, "format": "state_dict"})
            # safetensors metadata is str -> str.
            metadata = {"epoch": str(epoch), monitor: repr(value), "config_sha256": config_hash(config)}
            files.save("best.safetensors", safetensors_bytes(state, metadata), {**info, "format": "safetensors"})
        checkpoint = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "best_value": best_value,
            "history": history,
            "unfrozen": unfrozen,
            "freeze_manifest": manifest,
            "config": config,
        }
        save_full(files, checkpoint, keep_last_k)
        ran += 1
        if stop_after is not None and ran >= stop_after:
            break
    return history


def full_info(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What checkpoints.json records for a full checkpoint, read off the checkpoint itself."""
    last = checkpoint["history"][-1]
    return {"epoch": checkpoint["epoch"], "metric": {k: last[k] for k in ("val_loss", "val_acc")}, "format": "full"}


def save_full(files: RunFiles, checkpoint: dict[str, Any], keep_last_k: int) -> None:
    """last.ckpt, plus epoch-NNNN.ckpt files of which the newest keep_last_k stay.

    epoch-0003.ckpt holds the state after epoch 3 (as numbered in
    metrics.csv), so resuming from it runs epoch 4 next. An old epoch file is
    deleted only after the new one is complete.
    """
    payload = torch_bytes(checkpoint)
    info = full_info(checkpoint)
    if keep_last_k:
        files.save(f"epoch-{checkpoint['epoch']:04d}.ckpt", payload, info)
        epoch_files = sorted(name for name in files.files if name.startswith("epoch-"))
        for name in epoch_files[:-keep_last_k]:
            files.remove(name)
    files.save("last.ckpt", payload, info)
