"""BatchNorm policy: eval_all.

Every BatchNorm layer keeps its running statistics: its class gets a train()
that always means eval(), so no later model.train() call, on the model or on
any parent, can switch batch statistics back on. Affine parameters train
wherever their module trains.
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
    """Fix the running statistics of every BN layer; return their names."""
    fixed = []
    for name, module in model.named_modules():
        if isinstance(module, BATCHNORM_TYPES) and module.track_running_stats:
            module.__class__ = _stats_fixed_class(type(module))
            module.train(False)
            fixed.append(name)
    return fixed
