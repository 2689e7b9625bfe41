"""Setting up a run: everything that can reject the input comes before the run folder is touched.

start_run checks the config (and, for --resume, the checkpoint's), builds and
freezes the model and reads the data; only then does open_run claim the
folder, build the optimizer, put a resumed run's state back and write
what the run is. train.py holds the loop that follows.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .checkpoint import RunFiles, atomic_write, load_resume, torch_load
from .config import (
    Config,
    ConfigError,
    LogConfig,
    Stage,
    TrainConfig,
    apply_overrides,
    check,
    from_dict,
    load_config,
    parse_stages,
)
from .data import DEFAULT_DATA, class_names, count_classes_from, data_record, make_datasets, same_data, saved_split
from .distributed import World, on_main, start, wrap
from .ema import EMA
from .features import CachedBatches, cache_decision, cache_risks
from .freeze import (
    FreezeState,
    Selector,
    apply,
    check_stages,
    freeze,
    manifest,
    state_from_manifest,
)
from .grad_checkpointing import checkpoint_blocks
from .integrity import Integrity, check_optimizer
from .layers import freeze_summary, parameter_count
from .model import build_model
from .optim import cosine_schedule, lr_factors, make_optimizer, param_groups, trainable_names
from .rng import restore_rng, seed_everything
from .runfolder import Claim, check_destination, check_free, claim
from .saving import full_info, write_json
from .tracking import Trackers, check_packages, flat_params, open_trackers
from .weights import load_init


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
    data_record: dict[str, Any] = field(default_factory=dict)  # --data and a fingerprint of its files (data.json)
    sampler: DistributedSampler | None = None
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    caching: bool = False
    cache: tuple[CachedBatches, CachedBatches] | None = None
    trackers: Trackers | None = None
    lock: Claim | None = None
    integrity: Integrity | None = None
    ema: EMA | None = None  # with train.ema_decay > 0
    saved: int | None = None  # the last epoch whose files are all written
    checkpoint: dict[str, Any] | None = None
    resumed_from: Path | None = None
    first: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float = math.nan


@dataclass
class Asked:
    """What the caller asked for, as `fit` takes it."""

    out: str | Path | None
    data: str | None  # None: the resumed run's, else synthetic
    epochs: int | None
    init: str | Path | None
    resume: str | Path | None
    overrides: Sequence[str]
    device: str | None
    freeze_from: str | Path | None
    overwrite: bool
    count_classes: bool = False  # model.num_classes from an image folder's class folders


def pick_device(name: str | None = None) -> torch.device:
    """--device, else CUDA where there is one; a device this machine lacks is one line, not a traceback later."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: this project trains on cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


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
    # An empty list keeps nothing trainable: "*", which freeze() refuses; "*" in
    # it trains everything (a full fine-tune).
    if "*" in config.freeze.keep_trainable:
        return []
    return ["!" + str(selector) for selector in config.freeze.keep_trainable] or ["*"]


def read_manifest(model: nn.Module, path: str | Path) -> FreezeState:
    """--freeze-from: the freeze state another run wrote to freeze_manifest.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--freeze-from {path}: cannot read a JSON manifest ({err})") from None
    state = state_from_manifest(model, data, str(path))
    # The new run's own stages follow; the manifest's count belonged to its run.
    state.stages_done, state.stage_epochs = 0, []
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
    if asked.count_classes:
        # The count the run took from its folder; a --config that leaves it out does not change it.
        now["model"]["num_classes"] = saved.model.num_classes
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
    dev = pick_device(asked.device)
    world, dev = start(dev)
    checkpoint = resume = out = None
    if asked.resume is not None:
        config, checkpoint, resume = resumed_config(config, asked, world)
        out = resume.parent
    if config is None:
        raise ConfigError("no config: pass one, or --resume a run")
    # The run's own copy, with the epochs it plans for: what the checkpoints record.
    config = copy.deepcopy(config)
    config.train.epochs = config.train.epochs if asked.epochs is None else asked.epochs
    data = asked.data or (checkpoint or {}).get("data", {}).get("data") or DEFAULT_DATA
    if asked.count_classes and checkpoint is None:
        count_classes_from(data, config)
    check_config(config, world, dev)
    out = asked.out or out
    if out is None:
        raise ConfigError("no run folder: pass --out or --resume")
    check_destination(Path(out), "--out", folder=True)
    resuming = resume is not None and Path(out).resolve() == resume.parent.resolve()
    if resuming and asked.overwrite:
        raise ConfigError(
            f"--resume {asked.resume} continues the run in {out}, which --overwrite would delete first; "
            "pass one of them"
        )
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
    run = Run(config, data, config.train.epochs, Path(out), model, state, dev, world)
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
    run.train_set, run.val_set = make_datasets(data, config, split)
    run.classes = class_names(run.train_set, config.model.num_classes)
    run.data_record = data_record(data, run.train_set, run.val_set)
    if checkpoint is not None:
        check_same_data(checkpoint, run, resume)
    check_packages(config)
    return run


def resuming(run: Run) -> bool:
    """Whether this run continues the run its folder holds (a --resume into its own folder)."""
    return run.resumed_from is not None and run.out.resolve() == run.resumed_from.parent.resolve()


def check_same_data(checkpoint: dict[str, Any], run: Run, resume: Path) -> None:
    """A resume trains on the data the run began with: the same classes, and the same files when it recorded them."""
    saved = checkpoint.get("classes")
    if saved is not None and saved != run.classes:
        raise ConfigError(f"--resume {resume} was trained on the classes {saved}; --data {run.data} has {run.classes}")
    recorded = checkpoint.get("data")  # absent from checkpoints written before runs recorded their data
    if recorded is None or same_data(recorded, run.data_record):
        return
    was = ", ".join(f"{recorded[side]['images']} {side}" for side in ("train", "val"))
    now = ", ".join(f"{run.data_record[side]['images']} {side}" for side in ("train", "val"))
    raise ConfigError(
        f"--resume {resume} was trained on {recorded['data']} ({was} images); --data {run.data} gives "
        f"other images ({now}, or the same number changed, or an edited split.json): resume without --data"
    )


def open_run(run: Run, asked: Asked) -> None:
    """Claim the run folder (its lock, then the old run's files if asked), then the optimizer and the loaders."""
    if run.world.main:
        run.lock = claim(run.out, resuming=resuming(run), overwrite=asked.overwrite)
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
    write_json(run.out / "data.json", run.data_record)
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
    if run.config.train.ema_decay > 0:
        run.ema = EMA(model, run.config.train.ema_decay, run.config.train.ema_warmup)
        run.ema.follow(run.optimizer)
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
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
        raise ConfigError(f"--resume {resume}: its state does not fit this model and optimizer ({why})") from None
    if run.ema is not None:
        run.ema.load_state_dict(checkpoint["ema"], f"--resume {resume}")
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
