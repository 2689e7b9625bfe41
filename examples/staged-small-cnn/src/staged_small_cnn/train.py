"""Training: fit() is set up the run, then one epoch and a save, epoch after epoch.

Read top to bottom: train_one_epoch and evaluate, fit, then the steps of an
epoch: begin_stages (unfreeze), run_epoch, record. run.py sets the run up
(prepare_model builds, loads --init, freezes and sets the BatchNorm modes),
saving.py writes what each epoch leaves, and optim.py holds the param
groups and the schedule.
The same code runs as one process or as one of N under torchrun; see
distributed.py for what changes then.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .config import Config, Stage
from .distributed import SINGLE, World, all_sum, check_in_sync, on_main, sync_buffers
from .features import build_cache
from .freeze import unfreeze_stage
from .model import HEAD
from .optim import add_groups, optimizer_step, param_groups
from .run import Asked, Run, make_net, open_run, start_run
from .saving import DivergedError, best_files, find_best, read_weights, save, write_metrics

# How often a step reads back whether the loss stayed finite.
CHECK_EVERY = 16


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: every save either finished or left the previous file; its text says how to go on."""


def show_progress(world: World) -> bool:
    """Bars are for a person at a terminal; logs and CI get one line per epoch."""
    return world.main and sys.stderr.isatty() and not os.environ.get("CI")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: torch.dtype | None,
    desc: str | None = None,
    channels_last: bool = False,
) -> tuple[float, int, int]:
    """One pass over `loader`: summed loss, correct predictions and samples of this process.
    `amp` is the autocast dtype (None: full precision).
    `desc` turns on a progress bar with the running loss, accuracy and images/s.
    `loader` may yield images for the whole model or cached features for the head alone.
    """
    model.train()
    # Summed on the device: reading a number every step would wait for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # The first step whose loss is not finite, kept on the device and read
    # every CHECK_EVERY steps: no wait for the GPU at every step.
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    count = 0
    bar = tqdm(loader, desc=desc, disable=desc is None, leave=False, unit="batch", dynamic_ncols=True)
    started = time.perf_counter()
    for step, (inputs, labels) in enumerate(bar, 1):
        inputs, labels = to_device(inputs, device, channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        # The scaler keeps fp16 gradients from underflowing; disabled it is a no-op.
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if step % CHECK_EVERY == 0:
            stop_if_diverged(first_bad)
        if not bar.disable:
            bar.set_postfix(
                loss=f"{loss_sum.item() / count:.4f}",
                acc=f"{correct.item() / count:.3f}",
                img_s=f"{count / (time.perf_counter() - started):.0f}",
                # Drawn at tqdm's interval, and at the last step: a fast epoch
                # would otherwise end before its numbers were ever shown.
                refresh=step == bar.total,
            )
    stop_if_diverged(first_bad)
    return loss_sum.item(), int(correct.item()), count


def stop_if_diverged(first_bad: torch.Tensor) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise DivergedError(
            f"step {step}: the loss is not finite; lower train.lr"
            " (with fp16 autocast, try amp_dtype = 'bfloat16' or amp = false)"
        )


def to_device(inputs: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    # channels_last lets cuDNN pick its fastest (tensor-core) convolutions.
    if channels_last and inputs.dim() == 4:
        return inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
    return inputs.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    world: World = SINGLE,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over `loader`, summed over every rank's shard."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = to_device(inputs, device, channels_last), labels.to(device)
        logits = model(inputs)
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    loss, correct, count = all_sum([loss, correct, count], world, device)
    return loss / count, correct / count


def fit(
    config: Config | None,
    out: str | Path | None,
    *,
    data: str | None = None,
    epochs: int | None = None,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: Sequence[str] = (),
    stop_after: int | None = None,
    device: str | None = None,
    freeze_from: str | Path | None = None,
    overwrite: bool = False,
    count_classes: bool = False,
) -> list[dict[str, float]]:
    """Train and write the run folder; return one metrics row per epoch.

    `stop_after` ends this invocation after that many epochs, leaving the
    schedule planned for `epochs`: resume later with --resume.
    `resume` is a full checkpoint or a run folder (its newest checkpoint that
    matches checkpoints.json); `out` then defaults to that checkpoint's folder.
    A resume trains on with the config saved in the checkpoint; `config`, if
    given, may differ from it only in keys that cannot change the result,
    and so may `overrides` ("section.key=value", laid over the saved config).
    `data` is "synthetic" or an image folder; by default a resumed run's own, else "synthetic".
    `freeze_from` is a freeze_manifest.json whose freeze state replaces the
    config's spec. `overwrite` deletes the run a folder holds and starts over.
    `count_classes` takes model.num_classes from an image folder (the CLI's rule unless the user gives one).
    Under torchrun every process runs this with its share of each batch
    (`train.batch_size` is the global batch); rank 0 alone writes and prints.
    """
    asked = Asked(out, data, epochs, init, resume, overrides, device, freeze_from, overwrite, count_classes)
    run = start_run(config, asked)
    finished = False
    try:
        open_run(run, asked)
        for ran, epoch in enumerate(range(run.first, run.epochs), 1):
            begin_stages(run, epoch)
            try:
                row = run_epoch(run, epoch)
            except DivergedError as err:
                raise DivergedError(f"epoch {epoch}, {err}") from None
            run.integrity.check(run.model, run.optimizer, f"epoch {epoch}")
            record(run, row)
            save(run, row)
            if run.trackers is not None:
                if epoch in run.state.stage_epochs:  # a stage began: its freeze state, as saved
                    run.trackers.file(run.out / "freeze_manifest.json")
                run.trackers.sync(run.history)
            if stop_after is not None and ran >= stop_after:
                break
        finished = True
    except KeyboardInterrupt:
        raise Stopped(stopped_line(run)) from None
    finally:
        end_run(run, finished)
    return run.history


def end_run(run: Run, finished: bool) -> None:
    """Close the trackers, then release the folder's lock, whatever stopped the run."""
    try:
        if run.trackers is not None:
            run.trackers.close(best_files(run), failed=not finished)
    except KeyboardInterrupt:
        # A second Ctrl-C during the trackers' last upload: the run folder is whole all the same.
        raise Stopped(f"{stopped_line(run)}; the trackers' last upload was cut short") from None
    finally:
        if run.lock is not None:
            run.lock.close(keep=run.saved is not None)


def stopped_line(run: Run) -> str:
    if run.saved is None:
        return f"stopped before the first epoch was saved; {run.out} is left as it was, so the same command starts over"
    last = run.saved
    return f"stopped after epoch {last}, whose files are intact; continue with --resume {run.out}"


def begin_stages(run: Run, epoch: int) -> None:
    """Start every unfreeze stage due at `epoch`: release its part, in new param groups on the schedule."""
    while (why := stage_due(run, epoch)) is not None:
        stage = run.stages[run.state.stages_done]
        if stage.restore_best:
            why += restore_best(run)
        names = unfreeze_stage(run.model, run.state, stage, run.config.freeze.bn_modes, epoch)
        label = f"stage{run.state.stages_done}"
        new = param_groups(run.model, run.config, names, label, stage.lr_mult, epoch, stage.warmup_epochs)
        add_groups(run.model, run.optimizer, run.scheduler, new, run.config, run.epochs)
        run.groups = run.groups + new
        run.integrity.take(run.model)  # the fixed set is smaller now
        if run.ema is not None:
            run.ema.add(run.model, names)
        run.net = make_net(run.model, run.world, run.device, run.config)
        # freeze_manifest.json follows when this epoch's files are saved (saving.save), never before.
        if run.world.main:
            print(stage_line(run.model, epoch, stage, names, new) + why)
        if run.caching and names:
            run.caching, run.cache = False, None
            if run.world.main:
                print(f"epoch {epoch}: feature cache dropped, the backbone trains from here")


def stage_due(run: Run, epoch: int) -> str | None:
    """Whether the next stage starts at `epoch` (None: not yet), and why when its patience decided.

    A stage with patience starts once the monitored metric has not improved
    for that many epochs, counted from the start of the stage before it; at
    its epoch it starts anyway.
    """
    if run.state.stages_done == len(run.stages):
        return None
    stage = run.stages[run.state.stages_done]
    if stage.patience is None:
        return "" if stage.epoch <= epoch else None
    monitor, stalled = epochs_stalled(run)
    if stalled >= stage.patience:
        return f" ({monitor} has not improved for {stalled} epochs)"
    return f" (its epoch; {monitor} stalled {stalled} of {stage.patience} epochs)" if stage.epoch <= epoch else None


def epochs_stalled(run: Run) -> tuple[str, int]:
    """The monitored metric, and the epochs since it last improved or the last stage started, whichever is later."""
    monitor, best = best_epoch(run)
    if best is None:
        return monitor, 0
    since = run.state.stage_epochs[-1] if run.state.stage_epochs else 0
    return monitor, run.history[-1]["epoch"] - max(best, since - 1)


def best_epoch(run: Run) -> tuple[str, int | None]:
    """The monitored metric, and the first epoch that reached its best value so far (as save() counts one)."""
    monitor, mode = run.config.checkpoint.monitor, run.config.checkpoint.mode
    values = [row[monitor] for row in run.history]
    if not values:
        return monitor, None
    return monitor, run.history[values.index(min(values) if mode == "min" else max(values))]["epoch"]


def restore_best(run: Run) -> str:
    """Put the best weights so far back, as a stage with restore_best asks; the optimizer state carries on.

    Every weight returns to its best epoch's value, a part an earlier stage
    released since included (its optimizer state stays as trained).
    """
    _, epoch = best_epoch(run)
    # A resume into another folder finds the best weights in the one it came from.
    folders = [run.out] + ([run.resumed_from.parent] if run.resumed_from is not None else [])
    where = f"unfreeze.stages[{run.state.stages_done}].restore_best"
    # Rank 0 finds and checks the file; every rank reads it.
    path = on_main(lambda: find_best(folders, epoch, where), run.world)
    # An _ema monitor chose the averaged weights: an epoch file holds them in its EMA.
    run.model.load_state_dict(read_weights(path, averaged=run.config.checkpoint.monitor.endswith("_ema")))
    if run.ema is not None:
        run.ema.restart(run.model)  # the epochs just undone leave the average too
    return f"; restored the best weights, of epoch {epoch} ({path.name})"


def stage_line(model: nn.Module, epoch: int, stage: Stage, names: list[str], groups: list[dict[str, Any]]) -> str:
    """The one line an unfreeze stage prints: what it selected and what changed."""
    picked = ", ".join(map(str, stage.select))
    if not names:
        return f"epoch {epoch}: unfreeze stage {picked}: already trainable, nothing changes"
    released = set(names)
    size = sum(p.numel() for name, p in model.named_parameters() if name in released)
    warmup = f", {stage.warmup_epochs} warmup epochs" if stage.warmup_epochs else ""
    return (
        f"epoch {epoch}: unfreeze stage {picked}: {len(names)} tensors ({size:,} parameters) now train "
        f"in param groups {', '.join(repr(g['name']) for g in groups)} at lr x {stage.lr_mult:g}{warmup}"
    )


def run_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train one epoch and evaluate; the metrics row of metrics.csv."""
    run.sampler.set_epoch(epoch)
    started = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    desc = f"epoch {epoch}" if show_progress(run.world) else None
    if run.caching and run.cache is None:
        batch = run.config.train.batch_size
        run.cache = build_cache(run.model, run.train_set, run.val_set, run.sampler, batch, run.device, run.amp)
    if run.cache is not None:
        # Only the head runs: the same batches in the same order, minus the backbone.
        head = run.model.get_submodule(HEAD)
        sums = train_one_epoch(head, run.cache[0], run.optimizer, run.scaler, run.device, run.amp, desc)
    else:
        loader = run.train_loader
        sums = train_one_epoch(run.net, loader, run.optimizer, run.scaler, run.device, run.amp, desc, run.channels_last)
    loss_sum, correct, count = all_sum(list(sums), run.world, run.device)
    sync_buffers(run.model, run.world)
    check_in_sync(run.model, run.world)
    val_loss, val_acc = validate(run)
    run.scheduler.step()
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
        "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
    }
    if run.ema is not None:
        with run.ema.applied():
            row["val_loss_ema"], row["val_acc_ema"] = validate(run)
    return row


def validate(run: Run) -> tuple[float, float]:
    """Mean loss and accuracy on the val set, through the cached features while the head trains on them."""
    if run.cache is not None:
        return evaluate(run.model.get_submodule(HEAD), run.cache[1], run.device, run.world)
    return evaluate(run.model, run.val_loader, run.device, run.world, channels_last=run.channels_last)


def record(run: Run, row: dict[str, float]) -> None:
    """The row joins the history: metrics.csv and one printed line."""
    run.history.append(row)
    if not run.world.main:
        return
    write_metrics(run.out / "metrics.csv", run.history)
    print(
        f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.3f} "
        f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.3f} lr {row['lr']:.2e} "
        f"({row['seconds']:.1f}s, {row['images_per_s']:.0f} img/s)"
    )
