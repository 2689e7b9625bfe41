"""`linear_probe_small_cnn lr-find`: a learning-rate range test over the param groups `train` would use.

Step by step the lr grows exponentially from --start to --end, one batch a
step, and each group runs at that lr times its own lr_mult (layer decay and
train.lr_mult included). With --stage K the groups are those of the run once
its first K unfreeze stages have started. The test trains a copy of the
model with an optimizer of its own, and puts back every random generator it
drew from, so a `train` after it, even in the same process, is the same as
one without it (fastai #2892 is the failure this avoids).

It runs in one process, in full precision, and eagerly: the range depends on
the optimizer and the groups, not on the precision or the compiler.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from .config import Config, ConfigError, parse_stages
from .freeze import FreezeState, unfreeze_stage
from .optim import lr_factor, make_optimizer, param_groups, trainable_names
from .rng import rngs_kept
from .runfolder import LR_FIND_FILES, run_files
from .saving import DivergedError

COLUMNS = ("step", "lr", "loss", "smoothed_loss")
Sweep = tuple[float, float, int]  # the first lr, the last, and the steps between
MANIFEST_FILE = "freeze_manifest.json"  # every run writes it before its first epoch
MIN_STEPS = 20  # the first tenth is skipped and a slope needs 10 points
SMOOTHING = 0.8  # weight of the past in the loss's moving average: about 5 batches, so little lag
DIVERGED = 4.0  # the test stops once the smoothed loss is this many times its lowest
FELL = 0.95  # below this fraction of its first value, the loss has fallen enough to read a slope


@dataclass
class RangeTest:
    rows: list[dict[str, float]]
    stopped: str  # why the sweep ended
    groups: list[dict[str, Any]] = field(default_factory=list)


def check_request(out: Path, sweep_range: Sweep, stage: int, config: Config, overwrite: bool) -> None:
    """Every flag, before a model is built or a file written."""
    start, end, steps = sweep_range
    if not (0 < start < end < math.inf):
        raise ConfigError(f"--start {start:g} --end {end:g}: the range needs 0 < start < end, both finite")
    if steps < MIN_STEPS:
        raise ConfigError(f"--steps {steps}: at least {MIN_STEPS}, to leave a slope to suggest from")
    stages = parse_stages(config.unfreeze.stages)
    if not 0 <= stage <= len(stages):
        raise ConfigError(f"--stage {stage}: the config has {len(stages)} unfreeze stages; pick 0 to {len(stages)}")
    if stage and stages[stage - 1].epoch >= config.train.epochs:
        epoch, epochs = stages[stage - 1].epoch, config.train.epochs
        raise ConfigError(f"--stage {stage} starts at epoch {epoch}, after the run's last (train.epochs = {epochs})")
    # Above --out only a run's own record counts: a project folder has a config.toml too.
    runs = [out] if run_files(out) else [folder for folder in out.parents if (folder / MANIFEST_FILE).exists()]
    if runs:
        raise ConfigError(f"--out {out}: {runs[0]} holds a training run; lr-find writes beside runs, never into one")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {out}: {existing} is {'read-only' if existing.is_dir() else 'a file'}")
    earlier = [name for name in LR_FIND_FILES if (out / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"--out {out} already holds {earlier[0]}: pass another folder, or --overwrite to replace it")


def schedule_factor(config: Config, stage: int) -> float:
    """What the cosine schedule gives of train.lr at the epoch stage `stage` starts (1 at the run's start)."""
    stages = parse_stages(config.unfreeze.stages)
    epoch = stages[stage - 1].epoch if stage else 0
    return lr_factor(config.train.epochs, 0, 0)(epoch)


def staged_groups(model: nn.Module, state: FreezeState, config: Config, stage: int) -> list[dict[str, Any]]:
    """The param groups of a run once its first `stage` unfreeze stages have started (0: at its start)."""
    stages = parse_stages(config.unfreeze.stages)
    if not 0 <= stage <= len(stages):
        raise ValueError(f"stage {stage}: the config has {len(stages)} unfreeze stages")
    groups = param_groups(model, config, trainable_names(model), "trainable")
    for next_stage in stages[:stage]:
        names = unfreeze_stage(model, state, next_stage, config.freeze.bn_modes, next_stage.epoch)
        label = f"stage{state.stages_done}"
        groups += param_groups(
            model, config, names, label, next_stage.lr_mult, next_stage.epoch, next_stage.warmup_epochs
        )
    return groups


def lr_find(
    model: nn.Module,
    state: FreezeState,
    config: Config,
    train_set: Dataset,
    device: torch.device,
    stage: int = 0,
    sweep_range: Sweep = (1e-7, 10.0, 100),
) -> RangeTest:
    """The range test on a copy of `model`; `model`, `state` and every RNG are left as they were."""
    with rngs_kept():
        torch.manual_seed(config.train.seed)
        probe, probe_state = copy.deepcopy(model).to(device), copy.deepcopy(state)
        groups = staged_groups(probe, probe_state, config, stage)
        optimizer = make_optimizer(probe, config, groups)
        order = torch.Generator().manual_seed(config.train.seed)
        loader = DataLoader(train_set, config.train.batch_size, sampler=RandomSampler(train_set, generator=order))
        rows, stopped = sweep(probe, optimizer, forever(loader), device, sweep_range)
    if not rows:
        raise DivergedError(f"lr-find: {stopped}, the first step; lower --start")
    return RangeTest(rows, stopped, groups)


def forever(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


def sweep(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    sweep_range: Sweep,
) -> tuple[list[dict[str, float]], str]:
    """Train one batch per lr, rising from start to end; stop when the loss blows up."""
    start, end, steps = sweep_range
    growth = (end / start) ** (1 / (steps - 1))
    rows: list[dict[str, float]] = []
    average, lowest = 0.0, math.inf
    model.train()
    for step in tqdm(range(steps), desc="lr-find", leave=False, disable=None):
        lr = start * growth**step
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        inputs, labels = next(batches)
        loss = nn.functional.cross_entropy(model(inputs.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            return rows, f"the loss was not finite at lr {lr:.2e}"
        # Bias-corrected, so the first steps are not pulled towards 0.
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        rows.append({"step": step, "lr": lr, "loss": value, "smoothed_loss": smoothed})
        if smoothed > DIVERGED * lowest:
            return rows, f"the smoothed loss passed {DIVERGED:g}x its lowest at lr {lr:.2e}"
        lowest = min(lowest, smoothed)
    return rows, f"it reached --end {end:g}"


def suggest(rows: list[dict[str, float]]) -> tuple[float | None, str]:
    """The lr where the smoothed loss falls fastest per decade of lr, before its lowest point, and why.

    Steepest descent is the usual reading of a range test: the lowest point
    is already at the edge of divergence. The first tenth of the steps is
    skipped, where the average holds too few batches to have a slope.
    """
    lowest = min(range(len(rows)), key=lambda i: rows[i]["smoothed_loss"], default=-1)
    points = rows[max(3, len(rows) // 10) : lowest + 1]
    if len(points) < 10:
        return None, "fewer than 10 steps before the loss was lowest; lower --start or raise --steps"
    if points[-1]["smoothed_loss"] > FELL * rows[0]["smoothed_loss"]:
        return None, f"the loss fell by less than {1 - FELL:.0%} over the range; widen it or check the data"
    x = [math.log10(row["lr"]) for row in points]
    y = [row["smoothed_loss"] for row in points]
    slopes = [(y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]) for i in range(1, len(points) - 1)]
    return points[1 + min(range(len(slopes)), key=slopes.__getitem__)]["lr"], "the steepest fall"
