"""Shared fixtures: a shrunken config (tiny data, real code path) and its TOML file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import staged_small_cnn
from staged_small_cnn.config import Config, load_config
from staged_small_cnn.data import DEFAULT_DATA, make_datasets
from staged_small_cnn.model import HEAD, build_model

# The folder holding the package, installed or not, for child processes.
SRC = Path(staged_small_cnn.__file__).parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def small_config() -> Config:
    """The packaged config with a dataset small enough for a test."""
    cfg = load_config()
    vars(cfg.train).update(epochs=2, batch_size=32, image_size=32)
    shrink(cfg, 256, 128)
    cfg.log.tensorboard = False  # on in the packaged config; the tracker's own tests turn it on
    return cfg


def image_folder(root: Path, classes: int = 2, per_class: int = 2, names: list[str] | None = None) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png of random pixels; classes named class0, ... or `names`."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in names or [f"class{c}" for c in range(classes)]:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def shrink(config: Config, train_size: int, val_size: int) -> None:
    """A synthetic dataset of these sizes."""
    vars(config.data).update(synthetic_train_size=train_size, synthetic_val_size=val_size)


@pytest.fixture
def config() -> Config:
    return small_config()


def toml_value(value: object) -> str:
    # JSON spells strings, numbers and booleans the way TOML does; tables
    # (bn_modes, lr_mult, unfreeze stages) are written inline.
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(config: Config) -> str:
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def has_params(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def pretrained_like(path: Path, config: Config) -> dict[str, torch.Tensor]:
    """What a pretrained file is to a fine-tune, saved to `path`: features that fit the data, no head.

    One epoch of training on the synthetic data, everything trainable, then
    BatchNorm statistics measured over it. Random weights are no stand-in:
    their BatchNorm statistics (mean 0, variance 1) shrink a deep network's
    features to ~1e-9 (mobilenet_v3_large), and
    a head on random features of a deep network barely beats chance (resnet50).
    The head's tensors are left out, as a file trained for another task has
    its own.
    """
    torch.manual_seed(config.train.seed)
    model = build_model(config)
    train, _ = make_datasets(DEFAULT_DATA, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for inputs, labels in DataLoader(train, batch_size=config.train.batch_size, shuffle=True):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.optim.swa_utils.update_bn(DataLoader(train, batch_size=config.train.batch_size), model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(HEAD + ".")}
    torch.save(state, path)
    return state


def frozen_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def linear_probe(config: Config, key: str) -> Config:
    """Only the head trains and every BatchNorm outside it is fixed; `key` is the config's freeze list."""
    setattr(config.freeze, key, ["!head"])
    config.freeze.bn_modes = {"type:BatchNorm2d": "eval+frozen_affine"}
    config.unfreeze.stages = []
    return config


def fitted(config: Config, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, **options):
    """fit(), and the model it trained."""
    from staged_small_cnn import run, train

    models = []
    real = run.prepare_model

    def keep(*args, **kwargs):
        model, state = real(*args, **kwargs)
        models.append(model)
        return model, state

    monkeypatch.setattr(run, "prepare_model", keep)
    history = train.fit(config, tmp_path / name, device="cpu", **options)
    return models[0], history


@pytest.fixture
def config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process that must import the package too."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def torchrun(*args: str, processes: int, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` on this machine with `processes` workers."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    env = child_env(CI="true", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
