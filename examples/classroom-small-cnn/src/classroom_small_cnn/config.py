"""Every setting of a run, its default, and the one place each value is checked.

The defaults below are this project's answers. Change a value for one run
with `--set section.key=value` (`--set train.lr=0.003`), or many with
`--config FILE.toml` holding any of the sections below. A key that is not
here is refused with the closest real key: a typo never turns into a
silently ignored setting.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

BN_POLICIES = ("train", "eval_frozen", "eval_all", "replace_frozen")
BN_MODES = ("train", "eval", "eval+frozen_affine", "frozen")


class UserError(Exception):
    """A bad value or file: the command prints its one line and exits 2, before anything is written."""


@dataclass
class Stage:
    """At the start of `epoch` (from 0), `select` starts training, at lr x lr_mult."""

    epoch: int
    select: list[str | int]
    lr_mult: float = 0.1


@dataclass
class ModelConfig:
    num_classes: int = 10
    # Side of the square images the model sees (synthetic data and image folders).
    image_size: int = 32


@dataclass
class FreezeConfig:
    # Selectors of what is frozen, read in order (README "Freezing"): names,
    # child indices (ints, or "idx:-1"), globs, "re:" regexes, "!" takes back.
    frozen: list[str | int] = field(default_factory=lambda: ["!head"])
    # What BatchNorm does: train, eval_frozen, eval_all or replace_frozen.
    bn_policy: str = "eval_frozen"
    # A mode per selector, over bn_policy: {"block1" = "eval"}; later entries win.
    bn_modes: dict[str, str] = field(default_factory=dict)
    # Unfreeze stages: [[freeze.stages]] tables of epoch, select, lr_mult.
    stages: list[Stage] = field(default_factory=lambda: [])


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    # The peak learning rate; each epoch's lr follows a cosine from it (train.learning_rate).
    lr: float = 0.01
    weight_decay: float = 0.0001
    seed: int = 0


@dataclass
class DataConfig:
    # The generated data set behind `--data synthetic`.
    synthetic_train_size: int = 512
    synthetic_val_size: int = 256


@dataclass
class InitConfig:
    # `--init FILE` is refused when it fills less than this share of the model's tensors.
    min_loaded_fraction: float = 0.5
    # Load only the first N matching tensors, in the model's order (0: all of them).
    first_n: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """The defaults, then a TOML file, then each `section.key=value`; checked once, at the end."""
    values: dict[str, Any] = {}
    if path:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise UserError(f"--config {path}: cannot read it as TOML ({err})") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (sep and dot and name):
            raise UserError(f"--set {item!r}: write section.key=value, e.g. train.lr=0.003")
        values.setdefault(section, {})[name] = parse_value(text.strip())
    return config_from_dict(values)


def parse_value(text: str) -> Any:
    """A TOML value (3, 0.1, true, ["a", 1]); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise UserError(f"--set value {text[:40]!r}...: nested too deeply") from None


def config_from_dict(values: dict[str, Any]) -> Config:
    config = Config()
    for section, table in values.items():
        part = getattr(config, known(section, config, "section"), None)
        if not isinstance(table, dict):
            raise UserError(f"[{section}] must be a table of keys, got {table!r}")
        for key, value in table.items():
            name = known(key, part, f"key in [{section}]")
            setattr(part, name, checked_type(f"{section}.{key}", value, getattr(part, name)))
    config.freeze.stages = [make_stage(i, s) for i, s in enumerate(config.freeze.stages)]
    check(config)
    return config


def known(name: str, obj: Any, what: str) -> str:
    names = [f.name for f in fields(obj)]
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {near[0]}?" if near else f"; known: {', '.join(names)}"
        raise UserError(f"unknown {what} {name!r}{hint}")
    return name


def checked_type(key: str, value: Any, default: Any) -> Any:
    """`value` if it has the type of the default (an int is a fine float)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default) and not isinstance(default, Stage):
        raise UserError(f"{key} = {value!r}: expected a {type(default).__name__}, like {default!r}")
    return value


def make_stage(index: int, table: Any) -> Stage:
    if isinstance(table, Stage):
        return table
    where = f"freeze.stages[{index}]"
    if not isinstance(table, dict) or "epoch" not in table or "select" not in table:
        raise UserError(f"{where} must be a table with an epoch, a select and an optional lr_mult")
    for key in table:
        known(key, Stage, f"key in {where}")
    select = table["select"] if isinstance(table["select"], list) else [table["select"]]
    return Stage(table["epoch"], select, table.get("lr_mult", 0.1))


# The allowed range of each number: (lowest, highest).
RANGES = {
    "model.num_classes": (2, 100_000), "model.image_size": (8, 4096), "train.epochs": (1, 100_000),
    "train.batch_size": (1, 65_536), "train.lr": (1e-9, 10.0), "train.weight_decay": (0.0, 1.0),
    "train.seed": (0, 2**32 - 1), "data.synthetic_train_size": (1, 1_000_000),
    "data.synthetic_val_size": (1, 1_000_000), "init.min_loaded_fraction": (0.0, 1.0), "init.first_n": (0, 10**9),
}


def check(config: Config) -> None:
    """Each value's allowed range, in one place; the message names the key and what is allowed."""
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not low <= value <= high:
            raise UserError(f"{key} = {value}: allowed {low}..{high}")
    freeze = config.freeze
    if freeze.bn_policy not in BN_POLICIES:
        raise UserError(f"freeze.bn_policy = {freeze.bn_policy!r}; allowed: {', '.join(BN_POLICIES)}")
    for selector, mode in freeze.bn_modes.items():
        if mode not in BN_MODES:
            raise UserError(f"freeze.bn_modes {selector!r} = {mode!r}; allowed: {', '.join(BN_MODES)}")
    for i, stage in enumerate(freeze.stages):
        if not isinstance(stage.epoch, int) or not 0 <= stage.epoch < config.train.epochs or not stage.lr_mult > 0:
            raise UserError(f"freeze.stages[{i}]: epoch must be an int in 0..train.epochs-1 and lr_mult above 0")
    if [stage.epoch for stage in freeze.stages] != sorted(stage.epoch for stage in freeze.stages):
        raise UserError(f"freeze.stages must be in epoch order, got epochs {[stage.epoch for stage in freeze.stages]}")
