"""Shared fixtures: a shrunken config (tiny data, real code path) and its TOML file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resnet18_pattern.config import load_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def small_config() -> dict:
    """The packaged config with a dataset small enough for a test."""
    cfg = load_config()
    cfg["train"].update(epochs=2, batch_size=32, image_size=32)
    cfg["data"].update(synthetic_train_size=256, synthetic_val_size=128)
    # Tests make their own weights; nothing is downloaded.
    cfg["model"]["pretrained"] = False
    return cfg


@pytest.fixture
def config() -> dict:
    return small_config()


def to_toml(config: dict) -> str:
    # The config holds strings, numbers, booleans and flat lists: JSON
    # spells those the way TOML does.
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    return path
