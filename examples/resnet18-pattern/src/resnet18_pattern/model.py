"""The network: resnet18 with a new 10-class head at `fc`."""

from __future__ import annotations

from torch import nn
from torchvision.models import get_model, get_model_weights

HEAD = "fc"
ARCH = "resnet18"


class PretrainedWeightsError(RuntimeError):
    pass


def build_model(num_classes: int, pretrained: bool = False) -> nn.Module:
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
    replace_head(model, num_classes)
    return model


def replace_head(model: nn.Module, num_classes: int) -> None:
    parent_name, _, attr = HEAD.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
