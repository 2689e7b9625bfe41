"""Datasets: `custom_char_model.char_model:datasets(num_classes)` gives (train, val)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .config import Config
from .model import import_factory

DATA_FACTORY = "custom_char_model.char_model:datasets"
# The value of --data that reads the factory, and the only one this project takes.
DEFAULT_DATA = "custom"


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
