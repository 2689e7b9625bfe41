"""Datasets: `custom_char_model.char_model:datasets(num_classes)` gives (train, val)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .config import DEFAULT_DATA, Config
from .model import import_factory

DATA_FACTORY = "custom_char_model.char_model:datasets"


class DataError(ValueError):
    pass


def make_datasets(data: str, config: Config) -> tuple[Dataset, Dataset]:
    if data != DEFAULT_DATA:
        raise DataError(f"--data {data}: this project's data comes from custom_data = {DATA_FACTORY} (--data custom)")
    result = import_factory(DATA_FACTORY, "custom_data")(config.model.num_classes)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DataError(f"custom_data {DATA_FACTORY} must return (train_dataset, val_dataset), got {type(result)}")
    for split, dataset in zip(("train", "val"), result, strict=True):
        if len(dataset) == 0:
            raise DataError(f"custom_data {DATA_FACTORY}: the {split} dataset is empty")
    return result


# How much of each image the fingerprint reads: all of a small one, the header and first rows of a large one.
HEAD_BYTES = 1 << 16


def data_record(data: str, train: Dataset, val: Dataset) -> dict[str, Any]:
    """What a run trains on: --data, and per side a fingerprint of the images it uses (path, size, label, first bytes).

    Saved as RUN/data.json and in each full checkpoint; a resume on other
    data, or on an edited split.json, is refused by it. Data held in memory
    (synthetic, custom_data) has no files: its config is its fingerprint.
    """
    record: dict[str, Any] = {"data": data if data == DEFAULT_DATA else str(Path(data).resolve())}
    for side, dataset in (("train", train), ("val", val)):
        samples = used_samples(dataset)
        if samples is None:
            record[side] = {"images": len(dataset), "sha256": None}
            continue
        digest = hashlib.sha256()
        for path, label in samples:
            entry = [os.path.relpath(path, data), os.path.getsize(path), label]
            digest.update(json.dumps(entry).encode())
            with open(path, "rb") as f:
                digest.update(f.read(HEAD_BYTES))
        record[side] = {"images": len(samples), "sha256": digest.hexdigest()}
    return record


def same_data(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """The same images on each side (wherever the folder now is), or both held in memory."""
    return all(recorded.get(side) == now.get(side) for side in ("train", "val"))


def used_samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    """The (file, label) pairs a dataset reads, in order (an ImageFolder's, or a Subset's of one); None for tensors."""
    indices = getattr(dataset, "indices", None)
    base = getattr(dataset, "dataset", dataset) if indices is not None else dataset
    samples = getattr(base, "samples", None)
    if not isinstance(samples, list):
        return None
    return [samples[i] for i in indices] if indices is not None else list(samples)


def numbered_classes(num_classes: int) -> list[str]:
    """The names of classes that have none: class_0, class_1, ..."""
    return [f"class_{i}" for i in range(num_classes)]


def class_names(dataset: Dataset, num_classes: int) -> list[str]:
    """The class names in index order: an image folder's folder names, else numbered_classes."""
    names = getattr(dataset, "classes", None)
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    return numbered_classes(num_classes)


def example_inputs(config: Config, count: int) -> torch.Tensor:
    """`count` inputs from the custom_data training set: what export traces and the tests feed the model."""
    train, _ = make_datasets(DEFAULT_DATA, config)
    return torch.stack([train[i][0] for i in range(count)])
