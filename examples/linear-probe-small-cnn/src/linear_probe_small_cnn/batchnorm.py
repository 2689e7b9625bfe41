"""BatchNorm policy: eval_frozen.

BatchNorm layers inside frozen parts keep their running statistics and their
affine parameters. Setting requires_grad=False is not enough: in train() mode
a BN layer still normalises with batch statistics and overwrites its running
mean and variance, so a "frozen" backbone drifts. Here such a layer's class
gets a train() that always means eval(), so every later model.train() call,
on the model or on any parent, leaves it alone.
"""

from __future__ import annotations

from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def fix_batchnorm(model: nn.Module) -> list[str]:
    """Fix BN layers that the freeze spec touched; return their names.

    A layer counts as frozen when any of its affine parameters is frozen; its
    whole affine is then frozen with it, so statistics and scale never part.
    """
    fixed = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, BATCHNORM_TYPES) and any(not p.requires_grad for p in params):
            for param in params:
                param.requires_grad_(False)
                param.grad = None
            module.__class__ = _stats_fixed_class(type(module))
            module.train(False)
            fixed.append(name)
    return fixed
