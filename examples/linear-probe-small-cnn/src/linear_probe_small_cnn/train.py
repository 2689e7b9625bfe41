"""Training: fit() is set up the run, then one epoch and a save, epoch after epoch.

Read top to bottom: prepare_model (build, load --init, freeze, BatchNorm
modes), the Run that holds everything one training run needs, start_run,
then the steps of an epoch: begin_stages (unfreeze), train_one_epoch,
evaluate, record and save. optim.py holds the param groups and the schedule.
The same code runs as one process or as one of N under torchrun; see
distributed.py for what changes then.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import tomli_w
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from .checkpoint import (
    RunFiles,
    atomic_write,
    load_resume,
    non_finite,
    torch_bytes,
    torch_load,
)
from .config import Config, ConfigError, LogConfig, TrainConfig, apply_overrides, check, from_dict, load_config
from .data import DEFAULT_DATA, class_names, make_datasets, saved_split
from .distributed import SINGLE, World, all_sum, check_in_sync, gather, on_main, start, sync_buffers, wrap
from .features import CachedBatches, build_cache, cache_decision, cache_risks
from .freeze import (
    FreezeState,
    Selector,
    Stage,
    apply,
    check_stages,
    freeze,
    manifest,
    parse_stages,
    state_from_manifest,
    unfreeze_stage,
)
from .grad_checkpointing import checkpoint_blocks
from .integrity import Integrity, check_optimizer
from .layers import freeze_summary, parameter_count
from .model import HEAD, build_model
from .optim import (
    add_groups,
    cosine_schedule,
    lr_factors,
    make_optimizer,
    optimizer_step,
    param_groups,
    trainable_names,
)
from .rng import restore_rng, rng_state, seed_everything
from .runfolder import check_free, claim
from .tracking import Trackers, check_packages, flat_params, open_trackers
from .weights import load_init

# How often a step reads back whether the loss stayed finite.
CHECK_EVERY = 16


class DivergedError(RuntimeError):
    """The loss or the weights stopped being finite: nothing of that epoch is saved."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: every save either finished or left the previous file; its text says how to go on."""


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


def prepare_model(
    config: Config,
    init: str | Path | None = None,
    sync_bn: bool = False,
    freeze_from: str | Path | None = None,
) -> tuple[nn.Module, FreezeState]:
    """Build the model, load --init, apply the freeze spec (or a manifest) and the BatchNorm modes.

    Raises before anything is written when the spec, a stage, an lr_mult
    selector or the init file is wrong.
    """
    model = build_model(config)
    if init is not None:
        load_init(model, init, config.init)
    if sync_bn:
        # Before the BatchNorm modes, so layers they fix stay in eval mode and
        # never synchronise: only BatchNorm that trains pays for the all-reduce.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if freeze_from is not None:
        state = read_manifest(model, freeze_from)
        apply(model, state)
    else:
        state = freeze(model, freeze_spec(config), config.freeze.bn_modes, "freeze.keep_trainable")
    check_stages(model, parse_stages(config.unfreeze.stages))
    lr_factors(model, config)
    if config.train.grad_checkpointing:
        checkpoint_blocks(model)
    return model, state


def freeze_spec(config: Config) -> list[Selector]:
    # keep_trainable lists what trains; "!" turns each into "everything but".
    # An empty list keeps nothing trainable: "*", which freeze() refuses.
    return ["!" + str(selector) for selector in config.freeze.keep_trainable] or ["*"]


def read_manifest(model: nn.Module, path: str | Path) -> FreezeState:
    """--freeze-from: the freeze state another run wrote to freeze_manifest.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--freeze-from {path}: cannot read a JSON manifest ({err})") from None
    state = state_from_manifest(model, data, str(path))
    # The new run's own stages follow; the manifest's count belonged to its run.
    state.stages_done = 0
    return state


def make_net(model: nn.Module, world: World, device: torch.device, config: Config) -> nn.Module:
    """What the training step calls: the model, wrapped for DDP and compiled when asked.

    Rebuilt after every unfreeze stage: a DDP wrapper registers only the
    parameters that required grad when it was made, and a compiled graph
    can keep the old requires_grad flags (pytorch#139476), so both go.
    """
    net = wrap(model, world, device)
    if config.train.compile:
        torch.compiler.reset()
        net = torch.compile(net, backend=config.train.compile_backend)
    return net


def amp_dtype(train_cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full precision.

    CUDA (train.amp): bf16 where the GPU has it (no loss scaling needed),
    else fp16 with GradScaler. CPU (train.cpu_amp, off by default): bf16,
    which pays off only on CPUs with bf16 instructions.
    """
    choice = train_cfg.amp_dtype
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if device.type == "cuda" and train_cfg.amp:
        if choice == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dtypes[choice]
    if device.type == "cpu" and train_cfg.cpu_amp:
        return torch.bfloat16
    return None


def use_channels_last(setting: str | bool, model: nn.Module, device: torch.device) -> bool:
    """With "auto", on for a convolutional model on CUDA, where cuDNN's fastest kernels want NHWC."""
    if setting == "auto":
        return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    return setting


def loader_workers(setting: str | int, data: str, world: World) -> int:
    """With "auto", none for in-memory synthetic data; else the cores shared by the processes, up to 8."""
    if setting == "auto":
        return 0 if data == DEFAULT_DATA else min(8, max(1, (os.cpu_count() or 1) // world.size - 1))
    return setting


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


@dataclass
class Run:
    """Everything one training run holds between epochs."""

    config: Config
    data: str
    epochs: int
    out: Path
    model: nn.Module
    state: FreezeState
    device: torch.device
    world: World
    files: RunFiles | None = None
    stages: list[Stage] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    scaler: torch.amp.GradScaler | None = None
    amp: torch.dtype | None = None
    channels_last: bool = False
    net: nn.Module | None = None
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    classes: list[str] = field(default_factory=list)  # names in label order, saved with the weights
    sampler: DistributedSampler | None = None
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    caching: bool = False
    cache: tuple[CachedBatches, CachedBatches] | None = None
    trackers: Trackers | None = None
    lock: IO[str] | None = None
    integrity: Integrity | None = None
    saved: int | None = None  # the last epoch whose files are all written
    checkpoint: dict[str, Any] | None = None
    resumed_from: Path | None = None
    first: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float = math.nan


def fit(
    config: Config | None,
    out: str | Path | None,
    *,
    data: str = DEFAULT_DATA,
    epochs: int | None = None,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: Sequence[str] = (),
    stop_after: int | None = None,
    device: str | None = None,
    freeze_from: str | Path | None = None,
    overwrite: bool = False,
) -> list[dict[str, float]]:
    """Train and write the run folder; return one metrics row per epoch.

    `stop_after` ends this invocation after that many epochs, leaving the
    schedule planned for `epochs`: resume later with --resume.
    `resume` is a full checkpoint or a run folder (its newest checkpoint that
    matches checkpoints.json); `out` then defaults to that checkpoint's folder.
    A resume trains on with the config saved in the checkpoint; `config`, if
    given, may differ from it only in keys that cannot change the result,
    and so may `overrides` ("section.key=value", laid over the saved config).
    `freeze_from` is a freeze_manifest.json whose freeze state replaces the
    config's spec. `overwrite` deletes the run a folder holds and starts over.
    Under torchrun every process runs this with its share of each batch
    (`train.batch_size` is the global batch); rank 0 alone writes and prints.
    """
    asked = Asked(out, data, epochs, init, resume, overrides, device, freeze_from, overwrite)
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
    finally:
        if run.lock is not None:
            run.lock.close()


def stopped_line(run: Run) -> str:
    if run.saved is None:
        return f"stopped before the first epoch was saved; {run.out} holds no trained weights"
    last = run.saved
    return f"stopped after epoch {last}, whose files are intact; continue with --resume {run.out}"


@dataclass
class Asked:
    """What the caller asked for, as `fit` takes it."""

    out: str | Path | None
    data: str
    epochs: int | None
    init: str | Path | None
    resume: str | Path | None
    overrides: Sequence[str]
    device: str | None
    freeze_from: str | Path | None
    overwrite: bool


def check_config(config: Config, world: World, device: torch.device) -> None:
    """Every value of the config (config.check; --epochs is in train.epochs by now), then what depends on this run."""
    check(config)
    if config.train.batch_size % world.size:
        raise ConfigError(f"train.batch_size = {config.train.batch_size}: does not split over {world.size} processes")
    if config.train.sync_bn and world.distributed and device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA: SyncBatchNorm does not run on CPU; set it to false")


# Keys that cannot change what a run computes: a resume may take new values for them.
FREE_ON_RESUME = (
    "train.num_workers",
    "checkpoint.keep_last_k",
    *(f"log.{key.name}" for key in fields(LogConfig)),  # which trackers log, and where
)


def resumed_config(config: Config | None, asked: Asked, world: World) -> tuple[Config, dict[str, Any], Path]:
    """The checkpoint to resume, and the config that trained it.

    A config passed now must agree with the saved one in every key that
    changes the training trajectory; each difference is listed as old -> new.
    """
    if asked.freeze_from is not None or asked.init is not None:
        what = "--freeze-from" if asked.freeze_from is not None else "--init"
        raise ConfigError(f"{what} starts a new run and --resume continues one; pass one of them")
    path, checkpoint = find_checkpoint(asked.resume, world)
    try:
        # A key added to the project since (at its default, which keeps the old behaviour).
        tables = load_config().to_dict()
        for section, values in checkpoint["config"].items():
            tables.setdefault(section, {}).update(values)
        saved = from_dict(tables)
    except (ConfigError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: its config does not fit this project ({err})") from None
    now = config.to_dict() if config is not None else saved.to_dict()
    # --set on a resume is checked against the saved config like a --config file.
    apply_overrides(now, asked.overrides)
    if asked.epochs is not None:
        now["train"]["epochs"] = asked.epochs
    old = saved.to_dict()
    changed = [
        f"{section}.{key}: {value!r} -> {now[section][key]!r}"
        for section, values in old.items()
        for key, value in values.items()
        if now[section][key] != value and f"{section}.{key}" not in FREE_ON_RESUME
    ]
    if changed:
        raise ConfigError(f"--resume {path} was trained with another config; it would change " + "; ".join(changed))
    for name in FREE_ON_RESUME:
        section, key = name.split(".")
        setattr(getattr(saved, section), key, now[section][key])
    return saved, checkpoint, path


def find_checkpoint(resume: str | Path, world: World) -> tuple[Path, dict[str, Any]]:
    """The full checkpoint to resume from, verified against its run's checkpoints.json.

    Rank 0 alone chooses and verifies the file (hashes, fallbacks and what it
    skipped, printed once); every other rank loads that file.
    """
    chosen: dict[str, Any] = {}

    def choose() -> Path:
        chosen["path"], chosen["checkpoint"] = load_resume(resume)
        return chosen["path"]

    path = on_main(choose, world)
    return path, chosen["checkpoint"] if world.main else torch_load(path)


def start_run(config: Config | None, asked: Asked) -> Run:
    """Everything that can reject the input, before the run folder is touched: the config, the model, the data."""
    world, dev = start(asked.device)
    checkpoint = resume = out = None
    if asked.resume is not None:
        config, checkpoint, resume = resumed_config(config, asked, world)
        out = resume.parent
    if config is None:
        raise ConfigError("no config: pass one, or --resume a run")
    # The run's own copy, with the epochs it plans for: what the checkpoints record.
    config = copy.deepcopy(config)
    config.train.epochs = config.train.epochs if asked.epochs is None else asked.epochs
    check_config(config, world, dev)
    out = asked.out or out
    if out is None:
        raise ConfigError("no run folder: pass --out or --resume")
    resuming = resume is not None and Path(out).resolve() == resume.parent.resolve()
    check_free(Path(out), resuming=resuming, overwrite=asked.overwrite)
    # The model starts the same on every rank; what a step draws (dropout,
    # augmentation) is seeded per rank in open_run.
    seed_everything(config.train.seed)
    model, state = prepare_model(
        config,
        init=asked.init,
        sync_bn=config.train.sync_bn and world.distributed,
        freeze_from=asked.freeze_from,
    )
    run = Run(config, asked.data, config.train.epochs, Path(out), model, state, dev, world)
    run.stages = parse_stages(config.unfreeze.stages)
    run.checkpoint, run.resumed_from = checkpoint, resume
    if checkpoint is not None:
        # The freeze state exactly as saved, stages already applied included:
        # re-running the config's spec would freeze a backbone that an
        # earlier stage had released (the failure of re-freezing on resume).
        run.state = state_from_manifest(model, checkpoint["freeze_manifest"], f"{resume} freeze_manifest")
        apply(model, run.state)
    # A resumed one-folder run trains on the split it began with.
    split = saved_split(resume.parent) if resume is not None else None
    run.train_set, run.val_set = make_datasets(asked.data, config, split)
    run.classes = class_names(run.train_set, config.model.num_classes)
    saved = checkpoint.get("classes") if checkpoint is not None else None
    if saved is not None and saved != run.classes:
        raise ConfigError(
            f"--resume {resume} was trained on the classes {saved}; --data {asked.data} has {run.classes}"
        )
    check_packages(config)
    return run


def open_run(run: Run, asked: Asked) -> None:
    """Claim the run folder (its lock, then the old run's files if asked), then the optimizer and the loaders."""
    if run.world.main:
        run.lock = claim(run.out, overwrite=asked.overwrite)
        run.files = RunFiles(run.out)
        print(freeze_summary(run.model, run.state))
    seed_everything(run.config.train.seed + run.world.rank)
    build_training(run, run.checkpoint)
    if run.checkpoint is not None:
        restore(run, run.checkpoint, run.resumed_from)
    run.integrity = Integrity(run.model)
    if run.checkpoint is not None:
        where = f"--resume {run.resumed_from}"
        if "integrity" in run.checkpoint:  # absent from checkpoints written before the check existed
            run.integrity.check_saved(run.checkpoint["integrity"], where)
        check_optimizer(run.model, run.optimizer, where)
    if run.world.main:
        write_record(run)
    # Built after the freeze (and the stages a resume put back): DDP
    # registers only the parameters that require grad when it is made.
    run.net = make_net(run.model, run.world, run.device, run.config)
    make_loaders(run)
    if run.world.main:
        start_trackers(run)


def start_trackers(run: Run) -> None:
    """The trackers turned on in [log], told the config, the freeze counts and the manifest."""
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    counts = {"trainable_params": trainable, "frozen_params": parameter_count(run.model) - trainable}
    run.trackers = open_trackers(run.out, run.config, run.history, flat_params(run.config, counts))


def write_record(run: Run) -> None:
    """What the run is: its resolved config (`--config RUN/config.toml` repeats it), class names, freeze state."""
    atomic_write(run.out / "config.toml", lambda f: f.write(tomli_w.dumps(run.config.to_dict()).encode()))
    write_json(run.out / "classes.json", run.classes)
    split = getattr(run.train_set, "split", None)
    if split is not None:
        write_json(run.out / "split.json", split)
    write_json(run.out / "freeze_manifest.json", manifest(run.model, run.state, run.groups))


def build_training(run: Run, checkpoint: dict[str, Any] | None) -> None:
    """The optimizer over the trainable parameters, its schedule, and the precision and layout."""
    model = run.model
    model.to(run.device)
    if checkpoint is None:
        run.groups = param_groups(model, run.config, trainable_names(model), "trainable")
    else:
        run.groups = checkpoint["freeze_manifest"]["param_groups"]  # with the groups of stages done
    run.optimizer = make_optimizer(model, run.config, run.groups)
    run.scheduler = cosine_schedule(run.optimizer, run.epochs)
    train_cfg = run.config.train
    run.amp = amp_dtype(train_cfg, run.device)
    # Loss scaling keeps fp16 gradients from underflowing; bf16 has fp32's range and needs none.
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == torch.float16)
    run.channels_last = use_channels_last(train_cfg.channels_last, model, run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    run.best_value = math.inf if run.config.checkpoint.mode == "min" else -math.inf


def restore(run: Run, checkpoint: dict[str, Any], resume: Path) -> None:
    """Put a full checkpoint back: weights, optimizer, schedule, scaler, RNG, history."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] or not run.scaler.is_enabled():
        run.scaler.load_state_dict(checkpoint["scaler"])
    elif run.world.main:
        # Saved without AMP (on the CPU, or amp = false): no scale to restore.
        print("the checkpoint has no GradScaler state (saved without AMP); the scaler starts fresh")
    run.first, run.history = checkpoint["epoch"] + 1, checkpoint["history"]
    run.saved = checkpoint["epoch"]
    restore_rng(checkpoint["rng"], run.world, run.config.train.seed + run.first)
    run.best_value = checkpoint["best_value"]
    if not run.world.main:
        return
    print(f"resumed from {resume} after epoch {run.first - 1}")
    if run.first >= run.epochs and resume.name != "last.ckpt" and resume.resolve().parent == run.out.resolve():
        # Killed during the final save: the newest valid file is an
        # epoch file, and last.ckpt must not stay behind it.
        run.files.save("last.ckpt", resume.read_bytes(), full_info(checkpoint))


def make_loaders(run: Run) -> None:
    """The train and val loaders, and whether the head trains on cached features."""
    train_cfg, world = run.config.train, run.world
    workers = loader_workers(train_cfg.num_workers, run.data, world)
    loader_args = {"num_workers": workers, "pin_memory": run.device.type == "cuda", "persistent_workers": workers > 0}
    # The shuffle order depends on the seed and the epoch alone (set_epoch is
    # the sampler's whole state), so a resumed run sees exactly the batches an
    # uninterrupted one would, and rank r takes every world.size-th sample of
    # it: together the ranks see the batches one process would.
    run.sampler = DistributedSampler(run.train_set, num_replicas=world.size, rank=world.rank, seed=train_cfg.seed)
    batch = train_cfg.batch_size // world.size
    run.train_loader = DataLoader(run.train_set, batch, sampler=run.sampler, **loader_args)
    val_shard = Subset(run.val_set, range(world.rank, len(run.val_set), world.size))
    run.val_loader = DataLoader(val_shard, train_cfg.batch_size, **loader_args)
    risks = cache_risks(run.data, run.config, world)
    run.caching, why = cache_decision(run.model, train_cfg.cache_features, risks)
    if world.main:
        print(f"feature cache: {'on' if run.caching else 'off'} ({why})")


def begin_stages(run: Run, epoch: int) -> None:
    """Start every unfreeze stage due at `epoch`: release its part, in new param groups on the schedule."""
    while run.state.stages_done < len(run.stages) and run.stages[run.state.stages_done].epoch <= epoch:
        stage = run.stages[run.state.stages_done]
        names = unfreeze_stage(run.model, run.state, stage, run.config.freeze.bn_modes)
        label = f"stage{run.state.stages_done}"
        new = param_groups(run.model, run.config, names, label, stage.lr_mult, epoch, stage.warmup_epochs)
        add_groups(run.model, run.optimizer, run.scheduler, new, run.config, run.epochs)
        run.groups = run.groups + new
        run.integrity.take(run.model)  # the fixed set is smaller now
        run.net = make_net(run.model, run.world, run.device, run.config)
        if run.world.main:
            write_json(run.out / "freeze_manifest.json", manifest(run.model, run.state, run.groups))
            print(stage_line(run.model, epoch, stage, names, new))
        if run.trackers is not None:
            run.trackers.file(run.out / "freeze_manifest.json")
        if run.caching and names:
            run.caching, run.cache = False, None
            if run.world.main:
                print(f"epoch {epoch}: feature cache dropped, the backbone trains from here")


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
    if run.cache is not None:
        val_loss, val_acc = evaluate(head, run.cache[1], run.device, run.world)
    else:
        val_loss, val_acc = evaluate(run.model, run.val_loader, run.device, run.world, channels_last=run.channels_last)
    run.scheduler.step()
    seconds = time.perf_counter() - started
    return {
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


def save(run: Run, row: dict[str, float]) -> None:
    """best.* when the monitored metric improved; last.ckpt and the epoch files, every epoch.

    Weights that are not finite are never written: the files of the last good epoch stay.
    """
    bad = non_finite(run.model.state_dict())
    if bad:
        raise DivergedError(
            f"epoch {row['epoch']}: {len(bad)} tensors are not finite (first: {bad[0]}); "
            "nothing of this epoch was saved"
        )
    monitor, mode = run.config.checkpoint.monitor, run.config.checkpoint.mode
    value = row[monitor]
    if value < run.best_value if mode == "min" else value > run.best_value:
        run.best_value = value
        if run.world.main:
            save_best(run, row["epoch"], monitor, value)
    # Every rank's RNG, so each rank of a resumed run draws what it would have.
    rng = gather(rng_state(), run.world)
    if not run.world.main:
        return
    checkpoint = {
        "epoch": row["epoch"],
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng,
        "best_value": run.best_value,
        "history": run.history,
        "freeze_manifest": manifest(run.model, run.state, run.groups),
        "integrity": run.integrity.recorded(),
        "config": run.config.to_dict(),
        "classes": run.classes,
    }
    save_full(run.files, checkpoint, run.config.checkpoint.keep_last_k)
    run.saved = row["epoch"]


def save_best(run: Run, epoch: int, monitor: str, value: float) -> None:
    info = {"epoch": epoch, "metric": {monitor: value}}
    weights = run.model.state_dict()
    run.files.save("best.pt", torch_bytes(weights), {**info, "format": "state_dict"})


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


def best_files(run: Run) -> list[Path]:
    """The best weights, for the trackers: one file, the format every loader reads first."""
    names = ["best.pt"]
    return [run.out / name for name in names if (run.out / name).exists()][:1]


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
