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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .checkpoint import RunFiles, atomic_write, load_resume
from .config import (
    Config,
    ConfigError,
    Stage,
    apply_overrides,
    check,
    from_dict,
    load_config,
    parse_stages,
)
from .data import (
    DEFAULT_DATA,
    class_names,
    count_classes_from,
    data_record,
    example_inputs,
    make_datasets,
    same_data,
    saved_split,
)
from .freeze import (
    FreezeState,
    Selector,
    apply,
    check_stages,
    freeze,
    manifest,
    state_from_manifest,
)
from .integrity import Integrity, check_optimizer
from .layers import freeze_summary
from .lora import ADAPTERS, attach
from .model import HEAD, build_model
from .optim import cosine_schedule, make_optimizer, param_groups, trainable_names
from .rng import seed_everything, set_rng_state
from .runfolder import Claim, check_destination, check_free, claim
from .saving import full_info, write_json
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
    files: RunFiles | None = None
    stages: list[Stage] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    net: nn.Module | None = None
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    classes: list[str] = field(default_factory=list)  # names in label order, saved with the weights
    data_record: dict[str, Any] = field(default_factory=dict)  # --data and a fingerprint of its files (data.json)
    sampler: RandomSampler | None = None
    shuffle: torch.Generator = field(default_factory=torch.Generator)
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    lock: Claim | None = None
    integrity: Integrity | None = None
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
    pretrained: bool = False,
    freeze_from: str | Path | None = None,
) -> tuple[nn.Module, FreezeState]:
    """Build the model, load --init, apply the freeze spec (or a manifest) and the BatchNorm modes.

    Raises before anything is written when the spec, a stage or the init file is wrong.
    """
    model = build_model(config, pretrained=pretrained)
    if init is not None:
        load_init(model, init, config.init)
    # After --init, whose names are the base model's; before the freeze, which
    # keeps the adapters (and keep_trainable) trainable and fixes all else.
    attach(model, config.lora, example_inputs(config, 2))
    if freeze_from is not None:
        state = read_manifest(model, freeze_from)
        apply(model, state)
    else:
        state = freeze(model, freeze_spec(config), config.freeze.bn_modes, "freeze.keep_trainable")
    check_stages(model, parse_stages(config.unfreeze.stages))
    return model, state


def freeze_spec(config: Config) -> list[Selector]:
    # keep_trainable, the head (always: LoRA trains it in full) and the adapters
    # train; "!" turns each into "everything but".
    trainable = [str(selector) for selector in config.freeze.keep_trainable]
    if "*" in trainable:
        return []  # everything trains, adapters and base weights alike: a full fine-tune
    trainable += [] if HEAD in trainable else [HEAD]
    return ["!" + selector for selector in trainable] + (["!" + ADAPTERS] if config.lora.target else [])


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


def loader_workers(setting: str | int, data: str) -> int:
    """With "auto", none for in-memory synthetic data; else the cores but one, up to 8."""
    if setting == "auto":
        return 0 if data == DEFAULT_DATA else min(8, max(1, (os.cpu_count() or 1) - 1))
    return setting


def check_config(config: Config) -> None:
    """Every value of the config (config.check; --epochs is in train.epochs by now), then what depends on this run."""
    check(config)


# Keys that cannot change what a run computes: a resume may take new values for them.
FREE_ON_RESUME = (
    "train.num_workers",
    "checkpoint.keep_last_k",
)


def resumed_config(config: Config | None, asked: Asked) -> tuple[Config, dict[str, Any], Path]:
    """The checkpoint to resume, and the config that trained it.

    A config passed now must agree with the saved one in every key that
    changes the training trajectory; each difference is listed as old -> new.
    """
    if asked.freeze_from is not None or asked.init is not None:
        what = "--freeze-from" if asked.freeze_from is not None else "--init"
        raise ConfigError(f"{what} starts a new run and --resume continues one; pass one of them")
    path, checkpoint = load_resume(asked.resume)
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


def start_run(config: Config | None, asked: Asked) -> Run:
    """Everything that can reject the input, before the run folder is touched: the config, the model, the data."""
    dev = pick_device(asked.device)
    checkpoint = resume = out = None
    if asked.resume is not None:
        config, checkpoint, resume = resumed_config(config, asked)
        out = resume.parent
    if config is None:
        raise ConfigError("no config: pass one, or --resume a run")
    # The run's own copy, with the epochs it plans for: what the checkpoints record.
    config = copy.deepcopy(config)
    config.train.epochs = config.train.epochs if asked.epochs is None else asked.epochs
    data = asked.data or (checkpoint or {}).get("data", {}).get("data") or DEFAULT_DATA
    if asked.count_classes and checkpoint is None:
        count_classes_from(data, config)
    check_config(config)
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
    # The model starts the same whatever ran before in this process.
    seed_everything(config.train.seed)
    model, state = prepare_model(
        config,
        init=asked.init,
        pretrained=config.model.pretrained and asked.init is None and checkpoint is None,
        freeze_from=asked.freeze_from,
    )
    run = Run(config, data, config.train.epochs, Path(out), model, state, dev)
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
    run.lock = claim(run.out, resuming=resuming(run), overwrite=asked.overwrite)
    run.files = RunFiles(run.out)
    print(freeze_summary(run.model, run.state))
    build_training(run, run.checkpoint)
    if run.checkpoint is not None:
        restore(run, run.checkpoint, run.resumed_from)
    run.integrity = Integrity(run.model)
    if run.checkpoint is not None:
        where = f"--resume {run.resumed_from}"
        if "integrity" in run.checkpoint:  # absent from checkpoints written before the check existed
            run.integrity.check_saved(run.checkpoint["integrity"], where)
        check_optimizer(run.model, run.optimizer, where)
    write_record(run)
    # Built after the freeze (and the stages a resume put back).
    run.net = run.model
    make_loaders(run)


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
    """The optimizer over the trainable parameters, its schedule."""
    model = run.model
    model.to(run.device)
    if checkpoint is None:
        run.groups = param_groups(model, run.config, trainable_names(model), "trainable")
    else:
        run.groups = checkpoint["freeze_manifest"]["param_groups"]  # with the groups of stages done
    run.optimizer = make_optimizer(model, run.config, run.groups)
    run.scheduler = cosine_schedule(run.optimizer, run.epochs)
    run.best_value = math.inf if run.config.checkpoint.mode == "min" else -math.inf


def restore(run: Run, checkpoint: dict[str, Any], resume: Path) -> None:
    """Put a full checkpoint back: weights, optimizer, schedule, RNG, history."""
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
        raise ConfigError(f"--resume {resume}: its state does not fit this model and optimizer ({why})") from None
    run.first, run.history = checkpoint["epoch"] + 1, checkpoint["history"]
    run.saved = checkpoint["epoch"]
    set_rng_state(checkpoint["rng"][0])
    run.best_value = checkpoint["best_value"]
    print(f"resumed from {resume} after epoch {run.first - 1}")
    if run.first >= run.epochs and resume.name != "last.ckpt" and resume.resolve().parent == run.out.resolve():
        # Killed during the final save: the newest valid file is an
        # epoch file, and last.ckpt must not stay behind it.
        run.files.save("last.ckpt", resume.read_bytes(), full_info(checkpoint))


def make_loaders(run: Run) -> None:
    """The train and val loaders."""
    train_cfg = run.config.train
    workers = loader_workers(train_cfg.num_workers, run.data)
    loader_args = {"num_workers": workers, "pin_memory": run.device.type == "cuda", "persistent_workers": workers > 0}
    # The shuffle order depends on the seed and the epoch alone (run_epoch
    # seeds the generator), so a resumed run sees exactly the batches an
    # uninterrupted one would.
    run.sampler = RandomSampler(run.train_set, generator=run.shuffle)
    run.train_loader = DataLoader(run.train_set, train_cfg.batch_size, sampler=run.sampler, **loader_args)
    run.val_loader = DataLoader(run.val_set, train_cfg.batch_size, **loader_args)
