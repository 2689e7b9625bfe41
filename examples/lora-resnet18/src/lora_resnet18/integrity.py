"""Freeze integrity: what is fixed stays as it was, and the optimizer holds exactly what trains.

requires_grad = False only keeps autograd away. Code that writes into a
frozen weight under torch.no_grad() (an in-place init, a hand-rolled EMA, a
hook) still moves it, silently; a stage whose released tensors no param group
holds trains nothing. So after every epoch, and when a resume loads, the run
checks both and stops with one line naming the tensors.

The check is a checksum of every fixed tensor (frozen parameters, and the
buffers of BatchNorm layers whose mode fixes them), taken when the freeze is
set and again when a stage releases: the integer sum of each tensor's bit
pattern, computed on its device in one pass, with no copy. Any single write
changes it; only changes that cancel exactly in the sum could pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import batchnorm_layers, mode_of

# Integer views of the same bytes, by element size.
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class IntegrityError(RuntimeError):
    pass


def fixed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the run must not change: frozen parameters and fixed BatchNorm buffers."""
    fixed = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    for layer, module in batchnorm_layers(model).items():
        if mode_of(module) != "train":
            fixed.update({f"{layer}.{name}": b for name, b in module.named_buffers(recurse=False)})
    return fixed


def checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor, on the tensors' device: the sum of its elements' bit patterns."""
    sums = [t.detach().view(BITS[t.element_size()]).sum() for t in tensors]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


class Integrity:
    """The checksums of a model's fixed tensors, and the checks against them."""

    def __init__(self, model: nn.Module) -> None:
        self.take(model)

    def take(self, model: nn.Module) -> None:
        """Record the fixed set as it is now: at the freeze, and after each stage's release."""
        fixed = fixed_tensors(model)
        self.names, self.sums = list(fixed), checksums(list(fixed.values()))

    def recorded(self) -> dict[str, int]:
        """The checksums by name, as a full checkpoint stores them."""
        return dict(zip(self.names, self.sums.tolist(), strict=True))

    def check(self, model: nn.Module, optimizer: torch.optim.Optimizer, where: str) -> None:
        """Raise IntegrityError if a fixed tensor moved, or the optimizer's tensors are not the trainable ones."""
        fixed = fixed_tensors(model)
        if list(fixed) != self.names:
            raise IntegrityError(f"{where}: the set of frozen tensors changed without an unfreeze stage")
        moved = (checksums(list(fixed.values())) != self.sums).nonzero().flatten().tolist()  # one sync
        if moved:
            raise IntegrityError(
                f"{where}: {len(moved)} frozen tensors changed ({_first(self.names[i] for i in moved)}): "
                "something wrote into them outside the optimizer, e.g. code under torch.no_grad(); "
                "nothing of this epoch was saved"
            )
        check_optimizer(model, optimizer, where)

    def check_saved(self, saved: dict[str, int], where: str) -> None:
        """A resume's fixed tensors equal what the run recorded when it saved them."""
        now = self.recorded()
        differ = [name for name in now.keys() | saved.keys() if now.get(name) != saved.get(name)]
        if differ:
            raise IntegrityError(
                f"{where}: {len(differ)} fixed tensors differ from what the run recorded "
                f"({_first(sorted(differ))}); the checkpoint was changed after it was written"
            )


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, where: str) -> None:
    """The optimizer holds every trainable parameter and no frozen one."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = list(model.named_parameters())
    orphans = [name for name, p in named if p.requires_grad and id(p) not in held]
    if orphans:
        raise IntegrityError(
            f"{where}: {len(orphans)} trainable tensors are in no param group ({_first(orphans)}), "
            "so they never train: a release must add them to the optimizer (add_param_group)"
        )
    frozen = [name for name, p in named if not p.requires_grad and id(p) in held]
    if frozen:
        raise IntegrityError(
            f"{where}: the optimizer holds {len(frozen)} frozen tensors ({_first(frozen)}); "
            "weight decay and momentum would move them"
        )


def _first(names) -> str:
    names = list(names)
    return ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
