r"""What trains and what does not: selectors, BatchNorm modes, and the optimizer that follows them.

A selector picks parameters (a module brings every parameter inside it):

  "block1"                        a module or parameter name, at any depth
  1, -1, "idx:-2", "idx:0..2"     top-level children by position (a..b: Python's a:b)
  "block1.*", "*.bias"            a glob on module and parameter names
  "re:^block1[.]"                 a regex, searched in module and parameter names
  "!head"                         takes its matches back out

A list is read in order; a list that starts with "!" starts from every
parameter, so ["!head"] freezes everything but the head. A selector that
matches nothing is refused with the closest names: the blog habit of a
hand-typed name list freezes nothing when one name is misspelt, silently.

A frozen parameter has requires_grad=False and never enters the optimizer,
so neither weight decay nor Adam's running averages can move it.
"""

from __future__ import annotations

import difflib  # noqa: F401 (exercise 1 uses it)
import fnmatch  # noqa: F401 (exercise 1 uses it)
import re  # noqa: F401 (exercise 1 uses it)

import torch
import torch.nn.functional as F  # noqa: F401 (exercise 3 uses it)
from torch import nn

from .config import Config, UserError

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# Selectors
def select(model: nn.Module, selectors: list[str | int], where: str) -> set[str]:
    """The parameter names a list of selectors picks; `where` names the config key in errors."""
    params = [name for name, _ in model.named_parameters()]
    negated = [isinstance(s, str) and s.startswith("!") for s in selectors]
    chosen = set(params) if selectors and negated[0] else set()
    for selector, negate in zip(selectors, negated, strict=True):
        body = selector[1:] if negate else selector
        by_index = isinstance(body, int) or body.startswith("idx:")
        picked = match_children(model, str(body).removeprefix("idx:"), where) if by_index else match(model, body, where)
        chosen = chosen - picked if negate else chosen | picked
    return chosen


def match(model: nn.Module, selector: str, where: str) -> set[str]:
    """Exercise 1: freeze by name and by pattern.

    Return the parameter names one selector picks: a module name (all of its
    parameters) or a parameter name, a glob ("block[12].*", fnmatch.fnmatchcase)
    or "re:" and a regex (re.search), on module and parameter names. select()
    strips a leading "!"; match_children does the indices. Must hold: a selector
    that matches nothing, or a bad regex, raises UserError naming `where`, the
    selector and the closest names (difflib.get_close_matches). Not the habit:
    `if name in freeze_list` freezes nothing for a misspelt name, silently.
    """
    raise NotImplementedError("exercise 1: freeze.match is not written yet")


def match_children(model: nn.Module, span: str, where: str) -> set[str]:
    """`N` one top-level child (negative from the end), `a..b` the children a:b."""
    children = [name for name, _ in model.named_children()]
    listing = ", ".join(f"{i}={name}" for i, name in enumerate(children))
    try:
        start, stop = (int(x) if x else None for x in span.split("..")) if ".." in span else (int(span), None)
        picked = children[start:stop] if ".." in span else [children[start]]
    except (ValueError, IndexError):
        picked = []
    if not picked:
        raise UserError(f"{where}: idx:{span} picks no child; the model's children are {listing}")
    return params_of(model, picked)


def params_of(model: nn.Module, modules: list[str]) -> set[str]:
    return {f"{m}.{n}" for m in modules for n, _ in model.get_submodule(m).named_parameters()}


# BatchNorm: requires_grad=False does not stop model.train() from updating
# running_mean and running_var. A fixed layer's class gets a train() that
# always means eval(), so no model.train() call can switch it back on.
class FixedStats:
    """Mixed in before a BatchNorm class: train(True) is taken as train(False)."""

    def train(self, mode: bool = True) -> nn.Module:
        """Exercise 3: BatchNorm statistics that stay fixed.

        Whatever model.train() asks, keep this BatchNorm in eval mode through the
        parent class (super(): self.eval() would call this method again) and return
        self. Must hold: running_mean, running_var and num_batches_tracked stay
        bit-identical through model.train() and a forward pass. Not the habit:
        requires_grad=False or one bn.eval() before the loop; the next model.train()
        brings training mode back, and the statistics drift.
        """
        raise NotImplementedError("exercise 3: freeze.FixedStats.train is not written yet")


class FrozenBatchNorm(nn.Module):
    """BatchNorm as a fixed per-channel affine map; it keeps the layer's tensors and their names."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.plain, self.eps = type(bn), bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exercise 3: BatchNorm as a fixed affine map.

        Compute BatchNorm's eval-mode output from self.running_mean, running_var,
        eps and (when not None) weight and bias, channels on dimension 1, any rank.
        Must hold: it equals nn.BatchNorm2d in eval mode on the same tensors.
        """
        raise NotImplementedError("exercise 3: freeze.FrozenBatchNorm.forward is not written yet")


def batchnorm_modes(model: nn.Module, frozen: set[str], config: Config) -> dict[str, str]:
    """Each BatchNorm layer's mode: bn_policy by whether it sits in a frozen part, then bn_modes."""
    policy = config.freeze.bn_policy
    modes = {}
    for name, module in batchnorm_layers(model).items():
        # A layer without affine goes with the module around it.
        owner = name if module.weight is not None else name.rpartition(".")[0]
        in_frozen = bool(params_of(model, [owner]) & frozen) if owner else False
        if policy == "train" or not in_frozen:
            modes[name] = "eval" if policy == "eval_all" else "train"
        else:
            modes[name] = "frozen" if policy == "replace_frozen" else "eval+frozen_affine"
    for selector, mode in config.freeze.bn_modes.items():
        picked = match(model, selector, f"freeze.bn_modes {selector!r}")
        hits = [name for name in modes if params_of(model, [name]) & picked or name == selector]
        if not hits:
            raise UserError(f"freeze.bn_modes: {selector!r} holds no BatchNorm layer with parameters")
        modes.update(dict.fromkeys(hits, mode))
    return modes


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (*BATCHNORMS, FrozenBatchNorm))}


def mode_of(layer: nn.Module) -> str:
    if isinstance(layer, FrozenBatchNorm):
        return "frozen"
    if isinstance(layer, FixedStats):
        return "eval" if any(p.requires_grad for p in layer.parameters()) else "eval+frozen_affine"
    return "train"


def set_batchnorm_mode(model: nn.Module, name: str, mode: str) -> None:
    layer = model.get_submodule(name)
    if isinstance(layer, FrozenBatchNorm):  # back to the plain class, same tensors
        plain = layer.plain(len(layer.running_mean), eps=layer.eps, affine=layer.weight is not None)
        plain.weight, plain.bias = layer.weight, layer.bias
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(plain, buffer, getattr(layer, buffer))
        layer = replace_module(model, name, plain)
    elif isinstance(layer, FixedStats):
        layer.__class__ = layer.__class__.__bases__[1]
    layer.train(model.training)
    if mode != "train" and not layer.track_running_stats:
        raise UserError(f"freeze.bn_modes: {name} keeps no running statistics, so it can only train")
    if mode == "frozen":
        replace_module(model, name, FrozenBatchNorm(layer))
    elif mode != "train":
        layer.__class__ = type(f"Fixed{type(layer).__name__}", (FixedStats, type(layer)), {})
        layer.train(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return new


# The freeze state at an epoch follows from the config alone: the spec, less
# every stage that started before it. A resume recomputes it.
def stages_before(config: Config, epoch: int) -> int:
    return sum(1 for stage in config.freeze.stages if stage.epoch < epoch)


def apply_freeze(model: nn.Module, config: Config, stages_done: int) -> dict[str, str]:
    """Freeze the spec less the first `stages_done` stages; set BatchNorm modes; return them."""
    frozen = select(model, config.freeze.frozen, "freeze.frozen")
    for i, stage in enumerate(config.freeze.stages[:stages_done]):
        frozen -= select(model, stage.select, f"freeze.stages[{i}].select")
    modes = batchnorm_modes(model, frozen, config)
    for name, mode in modes.items():
        set_batchnorm_mode(model, name, mode)
        if mode in ("eval+frozen_affine", "frozen"):
            frozen |= params_of(model, [name])
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
        if name in frozen:
            param.grad = None  # a stale gradient must not reach an optimizer
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("freeze.frozen freezes every parameter, so nothing would train; leave the head out of it")
    return modes


def param_groups(model: nn.Module, config: Config, stages_done: int) -> list[list[str]]:
    """The names of each optimizer group: what trains from the start, then what each stage released.

    Applies every stage on the way, so a stage that releases nothing is refused
    here, before epoch 0, instead of at its epoch.
    """
    apply_freeze(model, config, 0)
    groups = [trainable(model)]
    for k in range(1, stages_done + 1):
        before = set(trainable(model))
        apply_freeze(model, config, k)
        groups.append([name for name in trainable(model) if name not in before])
        if not groups[-1]:
            raise UserError(f"freeze.stages[{k - 1}] releases nothing that is still frozen at its epoch")
    return groups


def trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# The optimizer holds only what trains; an unfreeze stage adds a param group.
def make_optimizer(model: nn.Module, config: Config, groups: list[list[str]]) -> torch.optim.Optimizer:
    """Exercise 2: an optimizer over what trains.

    AdamW with one param group per list of names in `groups` (0: trains from
    the start; k: released by stage k-1), each with "lr_mult" (1.0, then each
    stage's), lr=config.train.lr, weight_decay=config.train.weight_decay. Must
    hold: it holds exactly the parameters that train. Not the habit:
    AdamW(model.parameters()), where weight decay and Adam's moments move frozen
    weights whose .grad is a zero tensor.
    """
    raise NotImplementedError("exercise 2: freeze.make_optimizer is not written yet")


def release_stage(model: nn.Module, optimizer: torch.optim.Optimizer, config: Config, k: int) -> list[str]:
    """Exercise 2: an unfreeze stage the optimizer sees.

    Start stage k: freeze the spec less stages 0..k (param_groups(model, config,
    k + 1) does it and returns the groups), add what this stage releases to the
    optimizer as a new group with the stage's "lr_mult", return those names.
    Must hold: every released tensor is in the optimizer. Not the habit:
    requires_grad=True alone, which the optimizer never sees, so nothing trains.
    """
    raise NotImplementedError("exercise 2: freeze.release_stage is not written yet")


# Reports: the layers table and the freeze record saved with a run.
def layers_table(model: nn.Module) -> str:
    rows = [f"{'parameter':<44} {'shape':<20} {'count':>10}  state"]
    for name, p in model.named_parameters():
        state = "trains" if p.requires_grad else "frozen"
        rows.append(f"{name:<44} {str(tuple(p.shape)):<20} {p.numel():>10,}  {state}")
    rows += [f"{'BatchNorm ' + name:<76}  {mode_of(m)}" for name, m in batchnorm_layers(model).items()]
    children = ", ".join(f"{i}={name}" for i, name in enumerate(n for n, _ in model.named_children()))
    rows += [f"top-level children (for index selectors): {children}", freeze_summary(model)]
    return "\n".join(rows)


def freeze_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trains:,} of {total:,} parameters train ({100 * trains / total:.1f}%)"


def freeze_record(model: nn.Module, epoch: int) -> dict:
    """RUN/freeze_manifest.json: what was frozen when `epoch` ran."""
    params = list(model.named_parameters())
    return {
        "epoch": epoch,
        "frozen": [name for name, p in params if not p.requires_grad],
        "trainable": [name for name, p in params if p.requires_grad],
        "bn_modes": {name: mode_of(m) for name, m in batchnorm_layers(model).items()},
        "summary": freeze_summary(model),
    }
