"""The run configuration: typed sections, loaded from config.toml and checked once.

The packaged config.toml holds every key with its default and a comment; a
user's file overlays it. The classes below say what type each key takes, and
check() says which values are allowed. A key that is not here is an error
naming the closest real key (a typo must never become a setting that is
silently ignored), and every bad value is one line naming the key, the value
and what is allowed, before anything is built or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# Names the command line offers. They live here, not beside the code that uses
# them, because cli.py reads them without importing torch.
# The value of --data that needs no files.
DEFAULT_DATA = "synthetic"
# What `export --format` writes.
EXPORT_FORMATS = ("pt2", "onnx", "torchscript")

# A freeze selector: a name, glob, "re:", "idx:", "param_idx:" or "type:" string, or a child position.
Selector = str | int


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    num_classes: int
    pretrained: bool


@dataclass
class FreezeConfig:
    patterns: list[Selector]
    bn_modes: dict[str, str]


@dataclass
class UnfreezeConfig:
    # Each stage is a table of epoch, select, lr_mult and warmup_epochs, kept as the file wrote it (a run's
    # config.toml and its hash stay as they were); parse_stages below checks them and gives Stage objects.
    stages: list[dict[str, Any]]


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    no_decay_norm_bias: bool
    optimizer: Literal["adamw", "sgd"]
    momentum: float
    lr_mult: dict[str, float]
    layer_decay: float
    seed: int
    image_size: int
    amp: bool
    amp_dtype: Literal["auto", "bfloat16", "float16"]
    cpu_amp: bool
    channels_last: bool | Literal["auto"]
    num_workers: int | Literal["auto"]
    cache_features: bool | Literal["auto"]
    grad_checkpointing: bool
    compile: bool
    compile_backend: str
    ema_decay: float
    ema_warmup: bool
    sync_bn: bool


@dataclass
class LogConfig:
    tensorboard: bool


@dataclass
class DataConfig:
    augment: bool
    bad_images: Literal["error", "skip"]
    synthetic_train_size: int
    synthetic_val_size: int
    val_fraction: float


@dataclass
class InitConfig:
    min_loaded_fraction: float
    remap: list[list[str]]
    first_n: int


@dataclass
class CheckpointConfig:
    monitor: Literal["val_acc", "val_loss", "train_loss", "val_acc_ema", "val_loss_ema"]
    mode: Literal["max", "min"]
    keep_last_k: int


@dataclass
class Config:
    model: ModelConfig
    freeze: FreezeConfig
    unfreeze: UnfreezeConfig
    train: TrainConfig
    log: LogConfig
    data: DataConfig
    init: InitConfig
    checkpoint: CheckpointConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data, as checkpoints store it and config.toml spells it."""
        return dataclasses.asdict(self)


# Keys that moved: a file written for an older version of this project gets
# told where the setting lives now instead of a bare "unknown key".
MOVED = {
    "freeze.unfreeze_at_epoch": "[[unfreeze.stages]] epoch = N, select = <what to release>",
    "freeze.unfreeze_lr_mult": "lr_mult in its [[unfreeze.stages]] table",
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The packaged defaults, overlaid with the file at `path`, then `overrides`; typed and checked.

    An override is "section.key=value" (`--set` on the command line).
    """
    tables = _read(resources.files(__package__).joinpath("config.toml").read_text(), "the packaged config.toml")
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (IsADirectoryError, PermissionError) as err:
            raise ConfigError(f"--config {path}: cannot be read ({err.strerror}); pass a TOML file") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        _overlay(tables, _read(text, str(path)), str(path))
    apply_overrides(tables, overrides)
    # A bad value names its key; the file is worth naming when it is the only source.
    where = f"{path}: " if path is not None and not overrides else ""
    try:
        config = from_dict(tables)
        check(config)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return config


def given_keys(path: str | Path | None, overrides: Sequence[str] = ()) -> set[str]:
    """The "section.key" names the file at `path` and `overrides` set: what a user chose, not a packaged default.

    Call it after load_config read the same file and overrides without error.
    """
    tables = _read(Path(path).read_text(encoding="utf-8"), str(path)) if path is not None else {}
    keys = {f"{section}.{key}" for section, values in tables.items() if isinstance(values, dict) for key in values}
    return keys | {text.partition("=")[0].strip() for text in overrides}


def _read(text: str, name: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{name}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{name}: a value nests too deeply to be a config value") from None


def _overlay(tables: dict[str, Any], user: dict[str, Any], where: str) -> None:
    """The user's keys over the defaults; a section or key the defaults lack is an error."""
    for section, values in user.items():
        if section not in tables:
            raise ConfigError(f"{where}: unknown section [{section}]{_near(section, tables)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section} = {values!r:.40}: [{section}] must be a table of keys, not a value")
        for key, value in values.items():
            if f"{section}.{key}" in MOVED:
                raise ConfigError(f"{where}: {section}.{key} moved; write {MOVED[f'{section}.{key}']}")
            if key not in tables[section]:
                raise ConfigError(f"{where}: unknown key {section}.{key}{_near(key, tables[section])}")
            tables[section][key] = value


def apply_overrides(tables: dict[str, Any], overrides: Sequence[str]) -> None:
    """Each "section.key=value" over `tables`, in order.

    The value is read as TOML (3e-4, true, ["layer1"], { "layer4" = "eval" });
    text that is not a TOML value is taken as a string, so
    checkpoint.monitor=val_loss needs no quotes.
    """
    for text in overrides:
        name, equals, raw = text.partition("=")
        section, dot, key = name.strip().partition(".")
        if not equals or not dot or not section or not key:
            raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=3e-4")
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        except RecursionError:
            raise ConfigError(f"--set {name.strip()}=...: the value nests too deeply to be a config value") from None
        _overlay(tables, {section: {key: value}}, f"--set {text}")


def from_dict(tables: dict[str, dict[str, Any]]) -> Config:
    """A Config from plain tables (a TOML file, a checkpoint's copy); check() then says whether it is allowed."""
    sections = {}
    for section, kind in get_type_hints(Config).items():
        values, fields = tables.get(section, {}), get_type_hints(kind)
        unknown = sorted(values.keys() - fields.keys())
        if unknown:
            raise ConfigError(f"unknown key {section}.{unknown[0]}{_near(unknown[0], fields)}")
        missing = sorted(fields.keys() - values.keys())
        if missing:
            raise ConfigError(f"{section}.{missing[0]} is missing")
        # An int is a fine float (lr = 1 is 1.0).
        sections[section] = kind(**{k: float(v) if _is_number(v, fields[k]) else v for k, v in values.items()})
    return Config(**sections)


def _is_number(value: Any, expected: Any) -> bool:
    return expected is float and isinstance(value, int) and not isinstance(value, bool)


def check(config: Config) -> None:
    """Every type and allowed-value rule, in one place; the first broken one raises one line.

    load_config runs it, and so does train.fit, for a Config built or changed in code.
    """
    for section, kind in get_type_hints(Config).items():
        values = getattr(config, section)
        for key, expected in get_type_hints(kind).items():
            if not _fits(getattr(values, key), expected):
                raise ConfigError(f"{section}.{key} = {getattr(values, key)!r}: must be {_describe(expected)}")
    parse_stages(config.unfreeze.stages)  # each stage table's keys and types, before the rules read them
    for key, value, ok, allowed in _rules(config) + _bounds(config):
        if not ok:
            raise ConfigError(f"{key} = {value!r}: {allowed}")


@dataclass(frozen=True)
class Stage:
    """Release `select` at `epoch`; with `patience`, as soon as the monitored metric stalls that long."""

    epoch: int
    select: list[Selector]
    lr_mult: float = 1.0
    warmup_epochs: int = 0
    patience: int | None = None
    restore_best: bool = False


STAGE_KEYS = {
    "epoch": int,
    "select": (str, int, list),
    "lr_mult": (float, int),
    "warmup_epochs": int,
    "patience": int,
    "restore_best": bool,
}


def parse_stages(raw: list[Any]) -> list[Stage]:
    """[[unfreeze.stages]] tables as Stage objects, checked; ordered by epoch (ties keep file order).

    check() runs it, so a bad table fails when the config loads; the selections are resolved on the model later.
    """
    stages = []
    for i, table in enumerate(raw):
        where = f"unfreeze.stages[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table with epoch and select, got {table!r}")
        unknown = set(table) - set(STAGE_KEYS)
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{where}: unknown key {key!r}{_near(key, STAGE_KEYS)}")
        for key in ("epoch", "select"):
            if key not in table:
                raise ConfigError(f"{where}: {key} is missing")
        for key, kind in STAGE_KEYS.items():
            if key in table and (not isinstance(table[key], kind) or isinstance(table[key], bool) != (kind is bool)):
                raise ConfigError(f"{where}: {key} = {table[key]!r} has the wrong type")
        select = table["select"] if isinstance(table["select"], list) else [table["select"]]
        options = {key: table[key] for key in STAGE_KEYS if key in table and key not in ("epoch", "select")}
        stage = Stage(table["epoch"], select, **{**options, "lr_mult": float(options.get("lr_mult", 1.0))})
        if stage.epoch < 1 or stage.lr_mult <= 0 or stage.warmup_epochs < 0 or not select:
            raise ConfigError(f"{where}: needs epoch >= 1, lr_mult > 0, warmup_epochs >= 0 and a selection")
        if stage.patience is not None and stage.patience < 1:
            raise ConfigError(f"{where}: patience = {stage.patience}; it must be at least 1 epoch")
        stages.append(stage)
    return sorted(stages, key=lambda s: s.epoch)


def _fits(value: Any, expected: Any) -> bool:
    origin, args = get_origin(expected), get_args(expected)
    if expected is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, option) for option in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if expected in (int, float):
        # A bool is never a number here, though Python makes it an int.
        return isinstance(value, int if expected is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin, args = get_origin(expected), get_args(expected)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in args)
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a table of {_describe(args[1])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(expected, str(expected))


def _rules(config: Config) -> list[tuple[str, Any, bool, str]]:
    """(key, value, whether it is allowed, what is allowed)."""
    model, train, init = config.model, config.train, config.init
    rules = [
        ("model.num_classes", model.num_classes, model.num_classes >= 2, "a classifier needs at least 2 classes"),
        ("train.epochs", train.epochs, train.epochs >= 1, "at least 1"),
        ("train.batch_size", train.batch_size, train.batch_size >= 1, "at least 1"),
        ("train.lr", train.lr, math.isfinite(train.lr) and train.lr > 0, "a finite number > 0"),
        ("train.weight_decay", train.weight_decay, _finite(train.weight_decay, 0), "a finite number >= 0"),
        ("train.momentum", train.momentum, 0 <= train.momentum < 1, "a number in [0, 1), e.g. 0.9"),
        ("train.image_size", train.image_size, train.image_size >= 1, "at least 1 pixel"),
        ("train.layer_decay", train.layer_decay, 0 < train.layer_decay <= 1, "a number in (0, 1]; 1.0 is off"),
        ("train.ema_decay", train.ema_decay, 0 <= train.ema_decay < 1, "0 (off) or a number in (0, 1), e.g. 0.999"),
        ("train.num_workers", train.num_workers, _auto_or_at_least(train.num_workers, 0), '"auto" or >= 0'),
        ("init.min_loaded_fraction", init.min_loaded_fraction, 0 <= init.min_loaded_fraction <= 1, "in [0, 1]"),
        ("init.first_n", init.first_n, init.first_n >= 0, "0 (every match) or more"),
    ]
    for selector, mult in train.lr_mult.items():
        rules.append((f"train.lr_mult {selector!r}", mult, _finite(mult, 0) and mult > 0, "a multiplier > 0"))
    for key in ("synthetic_train_size", "synthetic_val_size"):
        rules.append((f"data.{key}", getattr(config.data, key), getattr(config.data, key) >= 1, "at least 1"))
    fraction = config.data.val_fraction
    rules.append(("data.val_fraction", fraction, _finite(fraction, 0) and 0 < fraction < 1, "between 0 and 1"))
    monitor = config.checkpoint.monitor
    averaged = not monitor.endswith("_ema") or train.ema_decay > 0
    rules.append(("checkpoint.monitor", monitor, averaged, "an _ema metric only with train.ema_decay > 0"))
    keep = config.checkpoint.keep_last_k
    rules.append(("checkpoint.keep_last_k", keep, keep >= 0, "0 (last.ckpt only) or more"))
    for rule in init.remap:
        rules.append(("init.remap", rule, len(rule) == 2 and _regex(rule[0]), "[regex, replacement] pairs"))
    return rules


# Beyond these a run fails later with a traceback (numpy's seed) or asks for more memory than a machine has.
MAX_SEED = 2**32 - 1 - 2**20  # seed + epoch and seed + rank stay below numpy's 2**32
MAX_CLASSES = 1_000_000
MAX_IMAGE_SIZE = 8192
MAX_SYNTHETIC = 10_000_000


def _bounds(config: Config) -> list[tuple[str, Any, bool, str]]:
    """The upper bounds, as (key, value, whether it is allowed, what is allowed)."""
    model, train = config.model, config.train
    rules = [
        ("train.seed", train.seed, 0 <= train.seed <= MAX_SEED, f"a whole number in [0, {MAX_SEED}]"),
        ("model.num_classes", model.num_classes, model.num_classes <= MAX_CLASSES, f"at most {MAX_CLASSES:,}"),
    ]
    size = train.image_size
    rules.append(("train.image_size", size, size <= MAX_IMAGE_SIZE, f"at most {MAX_IMAGE_SIZE}"))
    for key in ("synthetic_train_size", "synthetic_val_size"):
        size = getattr(config.data, key)
        rules.append((f"data.{key}", size, size <= MAX_SYNTHETIC, f"at most {MAX_SYNTHETIC:,} images"))
    if train.compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        ok = train.compile_backend in backends
        rules.append(("train.compile_backend", train.compile_backend, ok, f"one of {', '.join(backends)}"))
    return rules


def _auto_or_at_least(value: int | str, low: int) -> bool:
    return value == "auto" or value >= low


def _finite(value: float, low: float) -> bool:
    return math.isfinite(value) and value >= low


def _regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _near(word: str, known: Any) -> str:
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
