"""Training: fit() wires model, freeze, data and checkpoints together.

Read top to bottom: prepare_model (build, load --init, freeze, fix BN),
make_optimizer (trainable parameters only), train_one_epoch, evaluate, fit.
The same code runs as one process or as one of N under torchrun; see
distributed.py for what changes then.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .batchnorm import fix_batchnorm
from .checkpoint import RunFiles, atomic_write, config_hash, load_resume, safetensors_bytes, torch_bytes
from .config import ConfigError
from .data import make_datasets
from .distributed import SINGLE, World, all_sum, check_in_sync, gather, start, sync_buffers, wrap
from .freeze import freeze
from .layers import freeze_summary
from .model import build_model
from .weights import load_init

try:
    import numpy as np
except ImportError:  # torch runs without numpy; then there is no numpy RNG to seed or keep
    np = None

# New columns go at the end: scripts that read metrics.csv by position keep working.
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "train_acc",
    "images_per_s",
    "trainable_params",
)
# Metrics best.* can be chosen by; checkpoint.mode says whether more is better.
MONITORS = ("val_acc", "val_loss", "train_loss")
BN_POLICY = "eval_all"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if np is not None:
        np.random.seed(seed)


def prepare_model(
    config: dict,
    init: str | Path | None = None,
    sync_bn: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model, load --init, apply the freeze spec and BN policy.

    Raises before anything is written when the spec or the init file is wrong.
    """
    model = build_model(config["model"]["num_classes"])
    if init is not None:
        load_init(model, init, config["init"])
    if sync_bn:
        # Before the BN policy, so layers it fixes stay in eval mode and never
        # synchronise: only BatchNorm that trains pays for the all-reduce.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
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


def show_progress(world: World) -> bool:
    """Bars are for a person at a terminal; logs and CI get one line per epoch."""
    return world.main and sys.stderr.isatty() and not os.environ.get("CI")


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    use_amp: bool,
    desc: str | None = None,
) -> tuple[float, int, int]:
    """One pass over `loader`: summed loss, correct predictions and samples of this process.

    `desc` turns on a progress bar with the running loss, accuracy and images/s.
    """
    model.train()
    # Summed on the device: reading a number every step would wait for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    bar = tqdm(loader, desc=desc, disable=desc is None, leave=False, unit="batch", dynamic_ncols=True)
    started = time.perf_counter()
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        # The scaler keeps fp16 gradients from underflowing; disabled it is a no-op.
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        if not bar.disable:
            bar.set_postfix(
                loss=f"{loss_sum.item() / count:.4f}",
                acc=f"{correct.item() / count:.3f}",
                img_s=f"{count / (time.perf_counter() - started):.0f}",
                refresh=False,
            )
    return loss_sum.item(), int(correct.item()), count


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, world: World = SINGLE) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over `loader`, summed over every rank's shard."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    loss, correct, count = all_sum([loss, correct, count], world, device)
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


def restore_rng(states: list[dict[str, Any]], world: World, fallback_seed: int) -> None:
    """Put back this rank's RNG state; a different number of ranks cannot be matched."""
    if len(states) == world.size:
        set_rng_state(states[world.rank])
        return
    if world.main:
        print(
            f"the checkpoint holds RNG state for {len(states)} processes and this run has {world.size}: "
            "reseeding, so random draws (not the data order) differ from an uninterrupted run"
        )
    seed_everything(fallback_seed + world.rank)


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
    Under torchrun every process runs this with its share of each batch
    (`train.batch_size` is the global batch); rank 0 alone writes and prints.
    """
    train_cfg = config["train"]
    epochs = epochs or train_cfg["epochs"]
    world, dev = start(device)
    # The model starts the same on every rank; what a step draws (dropout,
    # augmentation) is seeded per rank below.
    seed_everything(train_cfg["seed"])
    # Everything that can reject the input runs before the run folder exists.
    if train_cfg["batch_size"] % world.size:
        raise ConfigError(f"train.batch_size {train_cfg['batch_size']} does not split over {world.size} processes")
    sync_bn = train_cfg["sync_bn"] and world.distributed
    if sync_bn and dev.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA: SyncBatchNorm does not run on CPU; set it to false")
    board_writer = tensorboard_writer() if config["log"]["tensorboard"] and world.main else None
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
        sync_bn=sync_bn,
    )
    train_set, val_set = make_datasets(data, config)
    out = Path(out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        files = RunFiles(out)
        print(freeze_summary(model, BN_POLICY))
    seed_everything(train_cfg["seed"] + world.rank)

    model.to(dev)
    optimizer = make_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, epochs)
    use_amp = train_cfg["amp"] and dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp)
    history: list[dict[str, float]] = []
    first = 0
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
        if checkpoint["scaler"] or not scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler"])
        elif world.main:
            # Saved without AMP (on the CPU, or amp = false): no scale to restore.
            print("the checkpoint has no GradScaler state (saved without AMP); the scaler starts fresh")
        first, history = checkpoint["epoch"] + 1, checkpoint["history"]
        restore_rng(checkpoint["rng"], world, train_cfg["seed"] + first)
        best_value = checkpoint["best_value"]
        manifest = checkpoint["freeze_manifest"]
        if world.main:
            print(f"resumed from {resume} after epoch {first - 1}")
        if world.main and first >= epochs and resume.name != "last.ckpt" and resume.resolve().parent == out.resolve():
            # Killed during the final save: the newest valid file is an
            # epoch file, and last.ckpt must not stay behind it.
            files.save("last.ckpt", resume.read_bytes(), full_info(checkpoint))
    if world.main:
        write_json(out / "freeze_manifest.json", manifest)
    # Built after the freeze and after any unfreeze a resume re-applied: DDP
    # registers only the parameters that require grad when it is made.
    net = wrap(model, world, dev)

    loader_args = {"num_workers": train_cfg["num_workers"], "pin_memory": dev.type == "cuda"}
    # The shuffle order depends on the seed and the epoch alone (set_epoch is
    # the sampler's whole state), so a resumed run sees exactly the batches an
    # uninterrupted one would, and rank r takes every world.size-th sample of
    # it: together the ranks see the batches one process would.
    sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank, seed=train_cfg["seed"])
    train_loader = DataLoader(train_set, train_cfg["batch_size"] // world.size, sampler=sampler, **loader_args)
    val_shard = Subset(val_set, range(world.rank, len(val_set), world.size))
    val_loader = DataLoader(val_shard, train_cfg["batch_size"], **loader_args)
    board = board_writer(out / "tensorboard", purge_step=first) if board_writer else None
    ran = 0
    for epoch in range(first, epochs):
        if epoch >= unfreeze_at and not unfrozen:
            names = unfreeze(model, optimizer, scheduler, config["freeze"]["unfreeze_lr_mult"])
            unfrozen = True
            # A new wrapper: the old one would never all-reduce the gradients
            # of the parameters that were frozen when it was built.
            net = wrap(model, world, dev)
            manifest = freeze_manifest(model, manifest["selectors"], manifest["bn_fixed"])
            if world.main:
                write_json(out / "freeze_manifest.json", manifest)
                released = set(names)
                size = sum(p.numel() for name, p in model.named_parameters() if name in released)
                print(
                    f"epoch {epoch}: freeze.unfreeze_at_epoch = {unfreeze_at} reached; {len(names)} tensors "
                    f"({size:,} parameters) now train in param group 'unfrozen' at "
                    f"lr x {config['freeze']['unfreeze_lr_mult']}"
                )
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        desc = f"epoch {epoch}" if show_progress(world) else None
        sums = train_one_epoch(net, train_loader, optimizer, scaler, dev, use_amp, desc)
        loss_sum, correct, count = all_sum(list(sums), world, dev)
        sync_buffers(model, world)
        check_in_sync(model, world)
        val_loss, val_acc = evaluate(model, val_loader, dev, world)
        scheduler.step()
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / count,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": seconds,
            "train_acc": correct / count,
            "images_per_s": count / seconds,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        history.append(row)
        if world.main:
            write_metrics(out / "metrics.csv", history)
            if board is not None:
                for key in METRIC_COLUMNS[1:]:
                    board.add_scalar(key, row[key], epoch)
                board.flush()
            print(
                f"epoch {epoch}: train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.3f} "
                f"val_loss {val_loss:.4f} val_acc {val_acc:.3f} lr {lr:.2e} "
                f"({seconds:.1f}s, {row['images_per_s']:.0f} img/s)"
            )
        value = row[monitor]
        if value < best_value if mode == "min" else value > best_value:
            best_value = value
            if world.main:
                info = {"epoch": epoch, "metric": {monitor: value}}
                state = model.state_dict()
                files.save("best.pt", torch_bytes(state), {**info, "format": "state_dict"})
                # safetensors metadata is str -> str.
                metadata = {"epoch": str(epoch), monitor: repr(value), "config_sha256": config_hash(config)}
                files.save("best.safetensors", safetensors_bytes(state, metadata), {**info, "format": "safetensors"})
        # Every rank's RNG, so each rank of a resumed run draws what it would have.
        rng = gather(rng_state(), world)
        if world.main:
            checkpoint = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
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
    if board is not None:
        board.close()
    return history


def tensorboard_writer() -> Any:
    """SummaryWriter, checked before the run folder exists: log.tensorboard needs the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "log.tensorboard = true needs the tensorboard package: "
            "pip install -e '.[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


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
