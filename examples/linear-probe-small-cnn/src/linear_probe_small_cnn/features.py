"""Feature caching for linear probing: run the frozen backbone once, then train the head alone.

When only the head trains, every epoch feeds the head the same backbone
outputs again, so after the first epoch the backbone's forward pass is pure
waste. That holds only when the backbone computes the same thing each time:
nothing in it trains, no BatchNorm updates statistics, no dropout or
stochastic depth draws a mask, and the training images are not randomly augmented. `cache_decision`
checks exactly that and says why when it says no.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .batchnorm import batchnorm_layers, mode_of
from .config import Config, ConfigError
from .data import DEFAULT_DATA
from .distributed import World
from .model import HEAD

# Layers that drop at random in train mode, by class name: torchvision's
# StochasticDepth and timm's DropPath, with the attribute holding their rate.
DROP_RATE_ATTRIBUTE = {"StochasticDepth": "p", "DropPath": "drop_prob"}


def drop_rate(module: nn.Module) -> float:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    attribute = DROP_RATE_ATTRIBUTE.get(type(module).__name__)
    return getattr(module, attribute, 0.0) if attribute else 0.0


def cache_decision(model: nn.Module, setting: str | bool, reasons_against: list[str]) -> tuple[bool, str]:
    """Whether to train on cached features, and the reason printed with it.

    `setting` is train.cache_features: "auto" caches when it is safe, true
    insists (an error when it is not safe), false never caches.
    `reasons_against` come from the caller (augmented data, torchrun).
    """
    if setting is False:
        return False, "train.cache_features = false"
    reasons = list(reasons_against)
    inside_head = HEAD + "."
    training = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(inside_head)]
    if training:
        reasons.append(f"{len(training)} tensors outside the head train (first: {training[0]})")
    moving = [n for n, m in batchnorm_layers(model).items() if not n.startswith(inside_head) and mode_of(m) == "train"]
    if moving:
        reasons.append(f"BatchNorm {moving[0]} updates its statistics (bn_policy / bn_modes)")
    dropout = [n for n, m in model.named_modules() if drop_rate(m) > 0 and not n.startswith(inside_head)]
    if dropout:
        reasons.append(f"{dropout[0]} draws a random mask each step (dropout or stochastic depth)")
    if not reasons:
        return True, "only the head trains and the backbone computes the same features every epoch"
    if setting is True:
        raise ConfigError(f"train.cache_features = true, but the backbone's output changes: {'; '.join(reasons)}")
    return False, "; ".join(reasons)


@torch.no_grad()
def head_inputs(
    model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head receives for every sample, in dataset order, on `device`; and the labels.

    Captured with a hook on the head, so any model whose head is applied last
    works without being taken apart.
    """
    captured: list[torch.Tensor] = []
    head = model.get_submodule(HEAD)
    # Kept in float32: a bf16/fp16 value converts exactly, autocast casts it
    # back for a training step, and evaluation (no autocast) needs float32.
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float()))
    labels = []
    model.train()  # as the training step runs it; nothing left in the backbone depends on the mode
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(images.to(device))
            labels.append(targets.to(device))
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(labels)


class CachedBatches:
    """(features, labels) batches in `order`: the batches a DataLoader would yield, minus the backbone."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, order: Sized, batch_size: int) -> None:
        self.features, self.labels, self.order, self.batch_size = features, labels, order, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.tensor(list(self.order), dtype=torch.long, device=self.features.device)
        for batch in indices.split(self.batch_size):
            yield self.features[batch], self.labels[batch]


def cache_risks(data: str, config: Config, world: World) -> list[str]:
    """What, besides the model, makes cached features differ from a fresh forward pass."""
    risks = []
    if data != DEFAULT_DATA and config.data.augment:
        risks.append("training images are randomly augmented ([data] augment = true)")
    if world.distributed:
        risks.append("under torchrun each process sees other samples every epoch")
    return risks


def build_cache(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    order: DistributedSampler,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> tuple[CachedBatches, CachedBatches]:
    """Head inputs of the whole train and val sets, batched as the loaders would batch them.

    `order` is the training sampler: each epoch's shuffle is the loader's.
    Train features under the training step's autocast, val features without
    it, as evaluate() runs the model.
    """
    train_features, train_labels = head_inputs(model, train_set, batch_size, device, amp)
    val_features, val_labels = head_inputs(model, val_set, batch_size, device, None)
    return (
        CachedBatches(train_features, train_labels, order, batch_size),
        CachedBatches(val_features, val_labels, range(len(val_set)), batch_size),
    )
