"""Datasets: a learnable synthetic set that needs no download, or an image folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

# ImageNet statistics: what torchvision's pretrained weights were trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    pass


def synthetic_datasets(
    num_classes: int, image_size: int, train_size: int, val_size: int, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Noisy images around one smooth random prototype per class.

    The prototypes are low-frequency colour patterns, so a CNN separates the
    classes within an epoch or two while the noise keeps it from being trivial.
    Train and validation share prototypes and differ in their noise.
    """
    generator = torch.Generator().manual_seed(seed)
    # A 4x4 colour pattern plus an overall colour per class, blown up smoothly.
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    coarse += torch.randn(num_classes, 3, 1, 1, generator=generator)
    prototypes = torch.nn.functional.interpolate(
        coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
    )

    def sample(size: int) -> TensorDataset:
        labels = torch.arange(size) % num_classes
        noise = torch.randn(size, 3, image_size, image_size, generator=generator)
        return TensorDataset(prototypes[labels] + noise, labels)

    return sample(train_size), sample(val_size)


def image_folder_datasets(
    root: str | Path, image_size: int, num_classes: int, augment: bool = True
) -> tuple[Dataset, Dataset]:
    """`root/train/<class>/*` and `root/val/<class>/*`, in torchvision's ImageFolder layout.

    `augment` false gives the training images the validation preprocessing.
    """
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError("reading an image folder needs torchvision: pip install -e '.[images]'") from None
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"{root / split} is not a directory; expected "
                f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
            )
    normalize = transforms.Normalize(MEAN, STD)
    # Train-time augmentation: random crops of 35-100% of the image and flips.
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train = datasets.ImageFolder(root / "train", transform=train_tf if augment else val_tf)
    val = datasets.ImageFolder(root / "val", transform=val_tf)
    if train.classes != val.classes:
        raise DataError(f"{root}: train classes {train.classes} differ from val classes {val.classes}")
    if len(train.classes) != num_classes:
        raise DataError(
            f"{root}/train has {len(train.classes)} classes but the model has "
            f"num_classes = {num_classes}; change [model] num_classes in the config"
        )
    return train, val


def make_datasets(data: str, config: dict) -> tuple[Dataset, Dataset]:
    train_cfg, data_cfg = config["train"], config["data"]
    if data == "synthetic":
        return synthetic_datasets(
            config["model"]["num_classes"],
            train_cfg["image_size"],
            data_cfg["synthetic_train_size"],
            data_cfg["synthetic_val_size"],
            seed=train_cfg["seed"],
        )
    if not Path(data).exists():
        raise DataError(f"--data {data}: no such directory (or use --data synthetic)")
    return image_folder_datasets(
        data, train_cfg["image_size"], config["model"]["num_classes"], augment=data_cfg["augment"]
    )
