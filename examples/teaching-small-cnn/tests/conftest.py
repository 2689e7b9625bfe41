"""Shared test helpers: a shrunken config (tiny data, the real code path) and a stand-in for pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from teaching_small_cnn.config import Config, load_config
from teaching_small_cnn.model import build_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false"))


@pytest.fixture
def config() -> Config:
    """The project's own settings, with little data and two epochs."""
    # A 32-pixel side keeps every backbone fast on a CPU (a ViT then sees 2x2 patches).
    return load_config(overrides=["data.synthetic_train_size=64", "data.synthetic_val_size=32", "model.image_size=32",
                                  "train.batch_size=16", "train.epochs=2"])


def pretrained(path: Path, config: Config) -> dict[str, torch.Tensor]:
    """A file of weights from another seed, standing in for a download; returns what it holds."""
    torch.manual_seed(1234)
    state = {k: v.clone() for k, v in build_model(config).state_dict().items()}
    torch.save(state, path)
    return state


def tiny_bn_model() -> nn.Module:
    """Two conv+BatchNorm parts and a head: BatchNorm behaviour, tested on every backbone's render."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
    )
