"""BatchNorm policy: replace_frozen.

BatchNorm layers inside frozen parts become FrozenBatchNorm: a fixed affine
layer, y = (x - mean) / sqrt(var + eps) * weight + bias, with nothing that
model.train() could switch back to batch statistics. The state_dict keys are
those of the BatchNorm it replaces, so weights load either way.
"""

from __future__ import annotations

import torch
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer turned into a fixed per-channel affine map."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.source_type = type(bn)  # what release_batchnorm turns it back into
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        # The same Parameter objects, frozen: unfreezing later needs no new tensors.
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


def fix_batchnorm(model: nn.Module) -> list[str]:
    """Replace BN layers that the freeze spec touched by FrozenBatchNorm; return their names."""
    fixed = []
    for name, module in list(model.named_modules()):
        params = list(module.parameters(recurse=False))
        frozen = any(not p.requires_grad for p in params)
        if isinstance(module, BATCHNORM_TYPES) and module.track_running_stats and frozen:
            for param in params:
                param.requires_grad_(False)
                param.grad = None
            _set_submodule(model, name, FrozenBatchNorm(module))
            fixed.append(name)
    return fixed


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)
