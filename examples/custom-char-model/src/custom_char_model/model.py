"""The network: custom with a 10-class head at `head`."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module

from torch import nn

from .config import Config, ConfigError

HEAD = "head"
# The model's blocks are its top-level children (train.layer_decay, train.grad_checkpointing and plan/suggest
# count them); name containers here to count theirs.
BLOCK_CONTAINERS: tuple[str, ...] = ()
# ImageNet statistics: images are normalised with them (and resized to
# image_size via a 256/224 larger resize, then a centre crop).
IMAGE_PREPROCESSING = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_fraction": 224 / 256,
}
MODEL_FACTORY = "custom_char_model.char_model:build_model"


def import_factory(path: str, answer: str):
    """`module:function` -> the function, with an error that says which answer to fix."""
    module_name, _, attr = path.partition(":")
    try:
        module = import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{answer} = {path!r}: cannot import {module_name} ({err})") from None
    if not callable(getattr(module, attr, None)):
        raise ConfigError(f"{answer} = {path!r}: {module_name} has no function {attr}")
    return getattr(module, attr)


def build_model(config: Config) -> nn.Module:
    """Your model, from `custom_char_model.char_model:build_model(num_classes)`; its `head` makes the logits."""
    model = import_factory(MODEL_FACTORY, "custom_model")(config.model.num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"custom_model {MODEL_FACTORY} returned {type(model).__name__}, not an nn.Module")
    try:
        model.get_submodule(HEAD)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        raise ConfigError(
            f"custom_head {HEAD!r} is not a module of {MODEL_FACTORY}'s model; it has: {', '.join(names)}"
        ) from None
    return model


def preprocessing() -> dict:
    return IMAGE_PREPROCESSING


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
