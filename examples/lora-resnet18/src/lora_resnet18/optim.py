"""The optimizer and its schedule: trainable parameters only, in named groups.

A frozen tensor left in an optimizer drifts whenever it gets a gradient, even
a zeroed one: weight decay shrinks it and Adam's moments keep moving it. So
none is ever added. Groups
are plain data (parameter names, not tensors): freeze_manifest.json records
them, a resume rebuilds the optimizer from them, and an unfreeze stage adds
its own through add_groups, which also tells the schedule about them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import Config


def param_groups(
    model: nn.Module,
    config: Config,
    names: list[str],
    label: str,
    lr_mult: float = 1.0,
    start_epoch: int = 0,
    warmup_epochs: int = 0,
) -> list[dict[str, Any]]:
    """Trainable `names` split into as few groups as their lr and weight decay need.

    Few groups keep foreach/fused optimizer kernels batching many tensors per launch.
    """
    train_cfg = config.train
    params = dict(model.named_parameters())
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name in names:
        factor = lr_mult
        # Biases and norm scales (every 1-d tensor) decay towards 0, which
        # only fights the normalisation; the usual recipe leaves them alone.
        no_decay = train_cfg.no_decay_norm_bias and params[name].ndim <= 1
        decay = 0.0 if no_decay else train_cfg.weight_decay
        if (factor, decay) not in groups:
            rate = "" if factor == 1 else f" lr x{factor:g}"
            plain = " no_decay" if no_decay and train_cfg.weight_decay else ""
            groups[factor, decay] = {
                "name": label + rate + plain,
                "lr_mult": factor,
                "weight_decay": decay,
                "start_epoch": start_epoch,
                "warmup_epochs": warmup_epochs,
                "params": [],
            }
        groups[factor, decay]["params"].append(name)
    return list(groups.values())


def make_optimizer(
    model: nn.Module, config: Config, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """train.optimizer over the trainable parameters only, grouped as `groups` says (default: by the config)."""
    if groups is None:
        groups = param_groups(model, config, trainable_names(model), "trainable")
    lr, params = config.train.lr, dict(model.named_parameters())
    torch_groups = [torch_group(params, group, lr) for group in groups]
    if config.train.optimizer == "sgd":
        # Each group carries its own weight_decay; SGD adds it to the gradient (L2), AdamW decays the weight.
        return torch.optim.SGD(torch_groups, lr=lr, momentum=config.train.momentum)
    return torch.optim.AdamW(torch_groups, lr=lr, weight_decay=config.train.weight_decay)


def torch_group(params: dict[str, nn.Parameter], group: dict[str, Any], lr: float) -> dict[str, Any]:
    # Everything but the tensors travels in the optimizer's state_dict too.
    meta = {k: v for k, v in group.items() if k != "params"}
    return {**meta, "params": [params[name] for name in group["params"]], "lr": lr * group["lr_mult"]}


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def lr_factor(epochs: int, start_epoch: int, warmup_epochs: int) -> Callable[[int], float]:
    """Cosine from 1 to 0 over the run, times a linear warmup from the group's first epoch.

    With warmup_epochs = w the group's first w epochs get 1/(w+1), 2/(w+1), ...
    of the cosine value, then the cosine value itself.
    """

    def factor(epoch: int) -> float:
        ramp = min(1.0, (epoch - start_epoch + 1) / (warmup_epochs + 1))
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * ramp

    return factor


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR factor per param group, so each group can start and warm up on its own."""
    factors = [lr_factor(epochs, g["start_epoch"], g["warmup_epochs"]) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def add_groups(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    groups: list[dict[str, Any]],
    config: Config,
    epochs: int,
) -> None:
    """Add newly trainable parameters to the optimizer *and* the schedule.

    LambdaLR keeps one base_lr and one factor per group, captured when it was
    built: a group added with add_param_group alone would keep its first lr
    for ever (or break schedulers that index groups). So each new group gets
    its initial_lr, a base_lr and a factor, and starts at the lr the
    schedule gives it for the current epoch.
    """
    params = dict(model.named_parameters())
    for group in groups:
        factor = lr_factor(epochs, group["start_epoch"], group["warmup_epochs"])
        torch_form = torch_group(params, group, config.train.lr)
        base_lr = torch_form["lr"]
        optimizer.add_param_group({**torch_form, "initial_lr": base_lr, "lr": base_lr * factor(scheduler.last_epoch)})
        scheduler.base_lrs.append(base_lr)
        scheduler.lr_lambdas.append(factor)
