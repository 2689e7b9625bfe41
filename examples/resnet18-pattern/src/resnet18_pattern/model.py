"""The network: resnet18 with a new 10-class head at `fc`."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torchvision.models import get_model, get_model_weights

from .config import Config

HEAD = "fc"
# Containers whose children are the model's blocks, in depth order: what
# train.layer_decay, train.grad_checkpointing and plan/suggest count.
BLOCK_CONTAINERS = ("layer1", "layer2", "layer3", "layer4")
ARCH = "resnet18"


class PretrainedWeightsError(RuntimeError):
    pass


def build_model(config: Config, pretrained: bool = False) -> nn.Module:
    """resnet18 from torchvision, with ImageNet weights when `pretrained`."""
    weights = get_model_weights(ARCH).DEFAULT if pretrained else None
    try:
        model = get_model(ARCH, weights=weights)
    except OSError as err:  # urllib's URLError is an OSError
        raise PretrainedWeightsError(
            f"could not download the {weights} weights for {ARCH} ({err}). "
            "Offline? Pass a local weights file with `--init FILE`, "
            "or set `pretrained = false` under [model] in the config."
        ) from err
    parent_name, _, attr = HEAD.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, config.model.num_classes))
    return model


def preprocessing() -> dict:
    """How the default weights' images were prepared (read from torchvision, nothing downloaded)."""
    transform = get_model_weights(ARCH).DEFAULT.transforms()
    return {
        "mean": tuple(transform.mean),
        "std": tuple(transform.std),
        "interpolation": transform.interpolation.value,
        "crop_fraction": transform.crop_size[0] / transform.resize_size[0],
    }


def blocks_with_parameters(model: nn.Module) -> list[str]:
    """The blocks that hold parameters, in depth order; the last holds the head.

    Top-level children, with each container of model.BLOCK_CONTAINERS
    replaced by its children (a ViT's encoder layers, a CNN's stages).
    """

    def expand(prefix: str, module: nn.Module) -> Iterator[str]:
        for name, child in module.named_children():
            if any(True for _ in child.parameters()):
                full = prefix + name
                yield from expand(full + ".", child) if full in BLOCK_CONTAINERS else [full]

    return list(expand("", model))
