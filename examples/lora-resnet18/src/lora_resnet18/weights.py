"""Starting from someone else's weights: plan the load, report it, then load.

`load_state_dict(strict=False)` skips keys without a word and still raises on
a shape mismatch. Here a plan is made first: which tensors of the file go to
which tensors of the model, and why the rest do not. `<pkg> inspect-weights`
prints the plan; `train --init` prints it, refuses a file that fills too
little of the model, and loads exactly what the plan says.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, non_finite, read_state_dict
from .config import ConfigError, InitConfig


@dataclass
class LoadPlan:
    source: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> tensor to load
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    beyond_first_n: list[str] = field(default_factory=list)
    converted: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)  # loaded, but as another kind
    # Not loaded: an integer or bool tensor of the file where the model holds a float weight.
    wrong_dtype: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)
    remapped: int = 0
    model_keys: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> list[str]:
        return list(self.tensors)

    def fraction(self) -> float:
        return len(self.tensors) / max(len(self.model_keys), 1)

    def refusal(self, min_loaded_fraction: float) -> str | None:
        """Why `train --init` refuses this plan, or None when it accepts it."""
        if self.wrong_dtype:
            key, file_dtype, model_dtype = self.wrong_dtype[0]
            return (
                f"{len(self.wrong_dtype)} tensors of {self.source} cannot carry the model's float weights "
                f"(first: {key}, {file_dtype} in the file, {model_dtype} in the model); refusing to train from it"
            )
        if self.fraction() >= min_loaded_fraction:
            return None
        return (
            f"only {self.fraction():.0%} of the model's tensors load from {self.source}; refusing to train from it "
            f"(init.min_loaded_fraction = {min_loaded_fraction})"
        )

    def rows(self) -> list[tuple[str, str]]:
        """(what happened, keys) pairs; runs of keys under one module collapse to `prefix.*`."""
        universe = self.model_keys + self.unexpected
        rows = [("loaded", label) for label in collapse(self.loaded, universe)]
        # Never collapsed: the two shapes are what tells a new head from a wrong file.
        for key, file, model in self.mismatched:
            rows.append(("shape mismatch", f"{key}  file {list(file)} model {list(model)}"))
        for key, file_dtype, model_dtype in self.converted:
            rows.append(("converted", f"{key}  file {file_dtype} -> model {model_dtype}"))
        for key, file_dtype, model_dtype in self.wrong_dtype:
            rows.append(("wrong dtype", f"{key}  file {file_dtype}, model {model_dtype}"))
        rows += [("beyond first_n", label) for label in collapse(self.beyond_first_n, universe)]
        rows += [("missing in file", label) for label in collapse(self.missing, universe)]
        rows += [("not in model", label) for label in collapse(self.unexpected, universe)]
        return rows

    def summary(self) -> str:
        """One line of what does not fit: the first names of each kind, as the table collapses them."""
        universe = self.model_keys + self.unexpected
        parts = [f"{len(self.tensors)} of {len(self.model_keys)} model tensors load"]
        for kind, keys in (("missing in file", self.missing), ("not in model", self.unexpected)):
            labels = collapse(keys, universe)
            if labels:
                more = f" (+{len(labels) - 3} more)" if len(labels) > 3 else ""
                parts.append(f"{kind}: {', '.join(labels[:3])}{more}")
        for key, file, model in self.mismatched[:3]:
            parts.append(f"shape mismatch: {key} file {list(file)} model {list(model)}")
        return "; ".join(parts)

    def format(self) -> str:
        header = (
            f"weights {self.source}: {len(self.tensors)} of {len(self.model_keys)} model tensors load "
            f"({self.fraction():.0%})"
        )
        if self.remapped:
            header += f"; {self.remapped} keys renamed by init.remap"
        rows = self.rows()
        width = max((len(kind) for kind, _ in rows), default=0)
        return "\n".join([header] + [f"  {kind:<{width}}  {label}" for kind, label in rows])


def collapse(keys: list[str], universe: list[str]) -> list[str]:
    """Name each key by its shortest dotted prefix whose keys (in `universe`) are all in `keys`.

    So a whole loaded `layer1` shows as `layer1.* (30 tensors)` and a lone
    head weight as `fc.weight`.
    """
    inside = set(keys)
    pure: dict[str, bool] = {}
    count: Counter[str] = Counter()
    for key in universe:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            pure[prefix] = pure.get(prefix, True) and key in inside
            count[prefix] += 1
    labels: list[str] = []
    for key in keys:
        parts = key.split(".")
        label = key
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if pure[prefix] and count[prefix] > 1:
                label = f"{prefix}.* ({count[prefix]} tensors)"
                break
        if label not in labels:
            labels.append(label)
    return labels


def compile_remap(remap: list[list[str]]) -> list[tuple[re.Pattern[str], str]]:
    # config.check has made sure each rule is a [regex, replacement] pair.
    return [(re.compile(pattern), replacement) for pattern, replacement in remap]


def apply_remap(source: dict[str, torch.Tensor], rules: list, plan: LoadPlan) -> dict[str, torch.Tensor]:
    """The file's tensors under the names init.remap gives them; counts the renamed keys in `plan`."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        new = key
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        plan.remapped += new != key
        if new in renamed:
            raise ConfigError(f"init.remap maps two keys of {plan.source} to {new!r}; make the patterns more specific")
        renamed[new] = value
    return renamed


def plan_load(model: nn.Module, source: dict[str, torch.Tensor], name: str, remap: list, first_n: int) -> LoadPlan:
    """Which tensors of `source` fill which of the model's, and why the rest do not.

    `first_n` > 0 keeps only the first N loadable keys in the model's own
    state_dict order: file order is no order at all for safetensors.
    """
    adapters = [key for key in source if ".base_layer." in key or ".lora_" in key]
    if adapters:
        # A LoRA run's last.ckpt or adapter file: its base weights sit under other names, and would not load.
        raise CheckpointError(
            f"{name} holds LoRA tensors (first: {adapters[0]}); pass the run's best.pt or best.safetensors"
        )
    plan = LoadPlan(name)
    renamed = apply_remap(source, compile_remap(remap), plan)
    target = model.state_dict()
    plan.model_keys = list(target)
    for key, value in target.items():
        if key not in renamed:
            plan.missing.append(key)
        elif renamed[key].shape != value.shape:
            plan.mismatched.append((key, tuple(renamed[key].shape), tuple(value.shape)))
        elif value.is_floating_point() and not (renamed[key].is_floating_point() or renamed[key].is_complex()):
            plan.wrong_dtype.append((key, renamed[key].dtype, value.dtype))
        elif first_n and len(plan.tensors) >= first_n:
            plan.beyond_first_n.append(key)
        else:
            plan.tensors[key] = renamed[key]
            if renamed[key].is_floating_point() != value.is_floating_point():
                # load_state_dict would cast it without a word: int64 counts into float weights, or back.
                plan.converted.append((key, renamed[key].dtype, value.dtype))
    plan.unexpected = [key for key in renamed if key not in target]
    return plan


def inspect_weights(model: nn.Module, path: str | Path, init_config: InitConfig) -> LoadPlan:
    """The plan for loading `path` into `model`, without loading it."""
    return plan_load(model, read_state_dict(path), str(path), init_config.remap, init_config.first_n)


def load_init(model: nn.Module, path: str | Path, init_config: InitConfig) -> LoadPlan:
    """Plan, print, check the plan against init.min_loaded_fraction, then load."""
    plan = inspect_weights(model, path, init_config)
    print(plan.format())
    bad = non_finite(plan.tensors)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors are not finite (first: {', '.join(bad[:3])}); none loaded")
    refusal = plan.refusal(init_config.min_loaded_fraction)
    if refusal is not None:
        raise CheckpointError(
            f"{refusal}. The table above shows what did not match: "
            "init.remap renames keys, a lower min_loaded_fraction accepts a partial file on purpose."
        )
    # strict=False is safe here: the plan has already named every key it skips.
    model.load_state_dict(plan.tensors, strict=False)
    return plan
