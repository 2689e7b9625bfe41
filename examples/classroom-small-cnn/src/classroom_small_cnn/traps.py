"""The blog traps, live: each habit of the fine-tuning articles beside this project's code, on this model.

Each function runs one habit as the articles write it, then does the same
job with this project's own functions, on the same model and data, and
returns what both sides measured. `classroom_small_cnn` traps prints them. The
articles: "pytorch冻结想冻结的预训练模型中的某一层" (zhihu), "固定部分参数进行训练",
"Freeze some layers in Pytorch", "Pytorch载入导出、冻结权重模板大全".
Every trap freezes all but the head, so "frozen" means the same on both sides.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint, freeze
from .config import Config, Stage, UserError
from .data import DEFAULT_DATA, datasets
from .model import build_model

HEAD = "head"
FULL = True  # whether runs write last.ckpt, which the resume trap needs
# (trap, what was measured, the habit's value, ours, whether the habit failed and ours held)
Row = tuple[str, str, object, object, bool]


def probe(config: Config) -> Config:
    """A copy of `config` that freezes all but the head, with BatchNorm fixed in the frozen part."""
    config = copy.deepcopy(config)
    config.freeze.frozen, config.freeze.bn_policy, config.freeze.stages = [f"!{HEAD}"], "eval_frozen", []
    return config


def fresh(config: Config) -> nn.Module:
    """The model with the same random weights each time, so both sides start equal."""
    torch.manual_seed(config.train.seed)
    return build_model(config)


def one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, after_backward=None) -> None:
    """The plain step both sides share; `after_backward` is where a habit meddles."""
    model.train()
    for inputs, labels in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        if after_backward:
            after_backward()
        optimizer.step()


def change(before: dict[str, torch.Tensor], model: nn.Module, names: list[str]) -> float:
    after = model.state_dict()
    return max((after[n].float() - before[n].float()).abs().max().item() for n in names)


def trap_typo(config: Config, loader: DataLoader) -> Row:
    """A hand-typed list of names to freeze with one misspelt: `if name in no_grad` never matches it."""
    model = fresh(config)
    names = [n for n, _ in model.named_parameters()][:2]
    no_grad = [names[0], names[1] + "s"]
    for name, param in model.named_parameters():
        param.requires_grad = name not in no_grad
    habit = sum(not p.requires_grad for p in model.parameters())
    try:
        ours: object = len(freeze.select(fresh(config), no_grad, "freeze.frozen"))
    except UserError as err:
        ours = f"refused: {str(err).partition('; ')[2]}"
    return ("typo", f"tensors frozen of the {len(no_grad)} listed", habit, ours, habit < 2 and ours != habit)


def trap_weight_decay(config: Config, loader: DataLoader) -> Row:
    """Every parameter in AdamW, the frozen ones' gradients zeroed: weight decay still shrinks them."""
    model = fresh(config)
    frozen = [n for n, _ in model.named_parameters() if not n.startswith(HEAD + ".")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    params = dict(model.named_parameters())
    one_epoch(model, optimizer, loader, lambda: [params[n].grad.zero_() for n in frozen])
    habit = change(before, model, frozen)
    model = fresh(config)
    freeze.apply_freeze(model, config, 0)
    optimizer = freeze.make_optimizer(model, config, [freeze.trainable(model)])
    one_epoch(model, optimizer, loader)
    ours = change(before, model, frozen)
    return ("weight decay", "largest change of a frozen weight in an epoch", habit, ours, habit > 0 and ours == 0)


def trap_batchnorm(config: Config, loader: DataLoader) -> Row:
    """requires_grad=False on the backbone, then model.train(): BatchNorm still updates its statistics."""
    model = fresh(config)
    stats = [n for n, _ in model.named_buffers() if n.endswith("running_mean") and not n.startswith(HEAD)]
    if not stats:
        return ("batchnorm", "this model has no BatchNorm", "-", "-", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(HEAD + ".")
    one_epoch(model, torch.optim.AdamW(model.get_submodule(HEAD).parameters()), loader)
    habit = change(before, model, stats)
    model = fresh(config)
    freeze.apply_freeze(model, config, 0)
    one_epoch(model, freeze.make_optimizer(model, config, [freeze.trainable(model)]), loader)
    ours = change(before, model, stats)
    return ("batchnorm", "largest change of a frozen running_mean", habit, ours, habit > 0 and ours == 0)


def trap_strict_false(config: Config, loader: DataLoader) -> Row:
    """A file saved from DataParallel (keys start with `module.`) loaded with strict=False: nothing loads."""
    source = {f"module.{k}": v + 1 for k, v in fresh(config).state_dict().items() if v.is_floating_point()}
    model = fresh(config)
    result = model.load_state_dict(source, strict=False)
    habit = len(source) - len(result.unexpected_keys)
    report = checkpoint.load_matching(fresh(config), source, config.init.min_loaded_fraction)
    ours = len(report["loaded"])
    return ("strict=False", f"tensors loaded of the {len(source)} in the file", habit, ours, habit == 0 < ours)


def trap_unfreeze_without_group(config: Config, loader: DataLoader) -> Row:
    """At the unfreeze epoch the habit flips requires_grad, but its optimizer was built on the head only."""
    config = copy.deepcopy(config)
    first = next(n for n, c in fresh(config).named_children() if any(True for _ in c.parameters()))
    config.freeze.stages = [Stage(epoch=1, select=[first], lr_mult=1.0)]
    released = [n for n, _ in fresh(config).named_parameters() if n.startswith(first + ".")]
    moved = []
    for habit in (True, False):
        model = fresh(config)
        optimizer = freeze.make_optimizer(model, config, freeze.param_groups(model, config, 0))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if habit:
            for name, param in model.named_parameters():
                param.requires_grad = param.requires_grad or name in released
        else:
            freeze.release_stage(model, optimizer, config, 0)
        one_epoch(model, optimizer, loader)
        moved.append(change(before, model, released))
    return ("unfreeze", f"largest change of {first} after its release", *moved, moved[0] == 0 < moved[1])


def trap_resume(config: Config, loader: DataLoader, fit: Callable) -> Row:
    """A resume from the weights alone: Adam's moments, the RNGs and the data order start over."""
    if not FULL:
        return ("resume", "needs the full checkpoint format, not chosen here", "-", "-", False)
    config = copy.deepcopy(config)
    with tempfile.TemporaryDirectory() as tmp:
        config.train.epochs = 2
        fit(config, Path(tmp) / "whole")
        whole = checkpoint.load_full(Path(tmp) / "whole" / "last.ckpt")["model"]
        config.train.epochs = 1
        fit(config, Path(tmp) / "half")
        state = checkpoint.load_full(Path(tmp) / "half" / "last.ckpt")
        model = fresh(config)
        model.load_state_dict(state["model"])  # the habit: the weights, then a new optimizer
        freeze.apply_freeze(model, config, 0)
        one_epoch(model, freeze.make_optimizer(model, config, [freeze.trainable(model)]), loader)
        habit = change(whole, model, list(whole))
        config.train.epochs = 2
        fit(config, Path(tmp) / "half", resume=state)
        ours = change(whole, model_from(checkpoint.load_full(Path(tmp) / "half" / "last.ckpt"), config), list(whole))
    return ("resume", "largest weight difference from an unbroken run", habit, ours, habit > 0 and ours == 0)


def model_from(state: dict, config: Config) -> nn.Module:
    model = fresh(config)
    model.load_state_dict(state["model"])
    return model


def print_traps(config: Config, fit: Callable) -> None:
    """Run every trap on little data and print a table; an exercise not written yet is a row that says so."""
    config = probe(config)
    config.data.synthetic_train_size, config.data.synthetic_val_size = 128, 64
    train_set = datasets(DEFAULT_DATA, config)[0]
    loader = DataLoader(train_set, config.train.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    traps = [trap_typo, trap_weight_decay, trap_batchnorm, trap_strict_false, trap_unfreeze_without_group]
    rows = []
    for trap in [*traps, trap_resume]:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the runs' own epoch lines
                rows.append(trap(config, loader, fit) if trap is trap_resume else trap(config, loader))
        except NotImplementedError as err:
            rows.append((trap.__name__[5:].replace("_", " "), f"waits for {err}", "-", "-", False))
    print(f"{'trap':<14} {'measured':<48} {'the habit':>12} {'this project':>14}")
    for name, measure, habit, ours, shown in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (habit, ours)]
        print(f"{name:<14} {measure:<48} {cells[0]:>12} {cells[1]:>14}{'' if shown else '  (not shown here)'}")

