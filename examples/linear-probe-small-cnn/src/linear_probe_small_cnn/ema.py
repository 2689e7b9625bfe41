"""An exponential moving average of the weights that train, and of nothing else.

Averaging the whole model (timm's ModelEmaV3 does) copies every frozen
tensor too, though a frozen tensor's average is the tensor itself. Here the
average holds one shadow tensor per trainable parameter, so its memory and
its time per step follow the trainable size: a linear probe of a ResNet-50
averages 20 thousand numbers, not 25 million. Frozen tensors and fixed
BatchNorm buffers are read from the model (they cannot differ). BatchNorm
statistics that train are taken as the model has them: they were gathered
under the trained weights, not the averaged ones (timm averages them too),
so where BatchNorm trains the averaged model is evaluated with slightly
mismatched statistics.

A parameter that an unfreeze stage releases joins the average at its
release, starting from its value then.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError

# With warmup the decay grows as (1 + t) / (WARMUP + t) towards train.ema_decay,
# so the first updates do not keep the initial weights for thousands of steps.
WARMUP = 10


class EMA:
    """Shadow copies of the trainable parameters, updated after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.add(model, [name for name, p in model.named_parameters() if p.requires_grad])

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Update after every step `optimizer` takes (one that GradScaler skips is not taken)."""
        optimizer.register_step_post_hook(lambda *_: self.update())

    def add(self, model: nn.Module, names: list[str]) -> None:
        """Start averaging `names` (what a stage released) from their values now."""
        params = dict(model.named_parameters())
        for name in names:
            self.params[name] = params[name]
            self.shadow[name] = params[name].detach().clone()

    def rate(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (WARMUP + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """shadow += (1 - decay) * (param - shadow), for every averaged parameter at once."""
        names = list(self.shadow)
        weight = 1.0 - self.rate()
        torch._foreach_lerp_([self.shadow[n] for n in names], [self.params[n].detach() for n in names], weight)
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        # One tensor at a time: the memory on top is the largest tensor, not a copy of the model.
        for name, p in self.params.items():
            held = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(held)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (to evaluate them); the trained ones come back after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()  # bit for bit: each value is copied, never recomputed

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A plain state_dict of the averaged model: what a model built without this project loads."""
        state = model.state_dict()
        first = {id(p): name for name, p in model.named_parameters()}
        # A tied weight has one entry per name in the state_dict: each gets the average.
        for name, p in model.named_parameters(remove_duplicate=False):
            if first[id(p)] in self.shadow:
                state[name] = self.shadow[first[id(p)]]
        return state

    def restart(self, model: nn.Module) -> None:
        """Average from the weights the model holds now (after restore_best put earlier ones back)."""
        self.add(model, list(self.shadow))

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": dict(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Put a saved average back; it must hold exactly the parameters averaged now."""
        if set(state["shadow"]) != set(self.shadow):
            extra = sorted(set(state["shadow"]) ^ set(self.shadow))
            raise CheckpointError(f"{source}: its EMA averages other parameters than this run trains ({extra[0]}, ...)")
        with torch.no_grad():
            for name, value in state["shadow"].items():
                self.shadow[name].copy_(value)
        self.updates = int(state["updates"])
