"""BatchNorm modes.

Setting requires_grad=False on a BatchNorm layer is not enough: in train()
mode it still normalises with batch statistics and overwrites its running
mean and variance, so a "frozen" backbone drifts. Each layer here has one of
four modes (freeze.py decides which, from bn_policy and freeze.bn_modes):

  train               plain BatchNorm
  eval                running statistics fixed; the affine trains where its
                      part trains
  eval+frozen_affine  statistics and affine fixed
  frozen              swapped for FrozenBatchNorm, a fixed per-channel affine
                      map with nothing train() could switch back on

A fixed layer's class gets a train() that always means eval(), so the mode
holds across any number of model.train() and model.eval() calls, on the
model, on a parent or on the layer itself.
"""

from __future__ import annotations

import torch
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
BN_MODES = ("train", "eval", "eval+frozen_affine", "frozen")
# Modes whose weight and bias never train, whatever the freeze spec says.
AFFINE_FIXED = ("eval+frozen_affine", "frozen")


class StatsFixed:
    """Mixed in before a BatchNorm class: train(True) is taken as train(False)."""

    def train(self, mode: bool = True):
        return super().train(False)


_fixed_classes: dict[type, type] = {}


def _stats_fixed_class(cls: type) -> type:
    # One subclass per BatchNorm class, so isinstance(m, nn.BatchNorm2d) holds.
    if cls not in _fixed_classes:
        _fixed_classes[cls] = type(f"StatsFixed{cls.__name__}", (StatsFixed, cls), {})
    return _fixed_classes[cls]


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer turned into a fixed per-channel affine map.

    It keeps the BatchNorm's Parameter and buffer objects under the same
    names, so state_dict keys do not change and releasing it later needs no
    new tensors (an optimizer holding them stays valid).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.source_type = _plain_class(type(bn))  # what plain_layer turns it back into
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, source={self.source_type.__name__}"


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer by name, whatever mode it is in now."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (*BATCHNORM_TYPES, FrozenBatchNorm))}


def mode_of(module: nn.Module) -> str:
    """The mode a layer is in; eval and eval+frozen_affine differ only in requires_grad."""
    if isinstance(module, FrozenBatchNorm):
        return "frozen"
    if isinstance(module, StatsFixed):
        params = list(module.parameters())
        return "eval+frozen_affine" if params and not any(p.requires_grad for p in params) else "eval"
    return "train"


def set_mode(model: nn.Module, name: str, mode: str) -> None:
    """Put BatchNorm layer `name` in `mode`; requires_grad of its affine is the caller's."""
    module = plain_layer(model, name)
    if mode == "train":
        return
    if not module.track_running_stats:
        raise ValueError(f"{name} has no running statistics (track_running_stats=False), so it can only train")
    if mode == "frozen":
        _set_submodule(model, name, FrozenBatchNorm(module))
    else:
        module.__class__ = _stats_fixed_class(type(module))
        module.train(False)


def plain_layer(model: nn.Module, name: str) -> nn.Module:
    """Turn layer `name` back into its plain BatchNorm class, in the model's train/eval mode."""
    module = model.get_submodule(name)
    if isinstance(module, FrozenBatchNorm):
        bn = module.source_type(
            module.num_features, eps=module.eps, momentum=module.momentum, affine=module.weight is not None
        )
        bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        _set_submodule(model, name, bn)
        module = bn
    elif isinstance(module, StatsFixed):
        module.__class__ = _plain_class(type(module))
    module.train(model.training)
    return module


def _plain_class(cls: type) -> type:
    return cls.__bases__[1] if issubclass(cls, StatsFixed) else cls


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)
