"""The data: a synthetic set that needs no download, or a folder of images.

An image folder holds train/ and val/, each with one folder per class of
image files (`DIR/train/cat/1.png`). Class names come from the folder names,
in sorted order, and train/ and val/ must name the same classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from .config import Config, UserError

# The value of --data that needs no files.
DEFAULT_DATA = "synthetic"
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# 8-bit modes PIL converts to RGB exactly; a 16-bit or float image would saturate.
MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as pretrained weights expect


def datasets(data: str, config: Config) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) for `--data synthetic` or `--data DIR`."""
    if data == DEFAULT_DATA:
        return synthetic(config)
    root = Path(data)
    splits = [root / "train", root / "val"]
    if not all(split.is_dir() for split in splits):
        raise UserError(f"--data {data}: expected synthetic, or a folder with train/ and val/ of class folders")
    classes = [sorted(p.name for p in split.iterdir() if p.is_dir()) for split in splits]
    if classes[0] != classes[1] or not classes[0]:
        raise UserError(f"--data {data}: train/ has classes {classes[0]}, val/ has {classes[1]}; they must agree")
    if len(classes[0]) != config.model.num_classes:
        raise UserError(
            f"--data {data} has {len(classes[0])} classes, model.num_classes is {config.model.num_classes}; "
            f"pass --set model.num_classes={len(classes[0])}"
        )
    side = config.model.image_size
    return ImageFiles(splits[0], classes[0], side, True), ImageFiles(splits[1], classes[0], side, False), classes[0]


def synthetic(config: Config) -> tuple[Dataset, Dataset, list[str]]:
    """Noisy images around one smooth random colour pattern per class: learnable in an epoch or two."""
    n, side = config.model.num_classes, config.model.image_size
    generator = torch.Generator().manual_seed(config.train.seed)
    coarse = torch.randn(n, 3, 4, 4, generator=generator) + 2 * torch.randn(n, 3, 1, 1, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)

    def sample(size: int) -> TensorDataset:
        labels = torch.arange(size) % n
        return TensorDataset(prototypes[labels] + torch.randn(size, 3, side, side, generator=generator), labels)

    classes = [f"class_{i}" for i in range(n)]
    return sample(config.data.synthetic_train_size), sample(config.data.synthetic_val_size), classes


class ImageFiles(Dataset):
    """The image files of each class folder; links are refused, so no file is read from outside it."""

    def __init__(self, split: Path, classes: list[str], side: int, augment: bool) -> None:
        from torchvision import transforms as T  # only an image folder needs torchvision

        self.samples = []
        for label, name in enumerate(classes):
            for path in sorted((split / name).iterdir()):
                if path.is_symlink():
                    raise UserError(f"{path} is a link; copy the image into the class folder instead")
                if path.suffix.lower() in EXTENSIONS:
                    check_image(path)
                    self.samples.append((path, label))
        if not self.samples:
            raise UserError(f"{split} holds no image files ({', '.join(sorted(EXTENSIONS))})")
        # Training sees random crops and flips; validation always the same centre crop.
        shape = [T.RandomResizedCrop(side, scale=(0.5, 1.0)), T.RandomHorizontalFlip()]
        if not augment:
            shape = [T.Resize(side), T.CenterCrop(side)]
        self.transform = T.Compose([*shape, T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def check_image(path: Path) -> None:
    """Read the header only: a file that is no image, or not 8-bit, is named before training starts."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not a readable image ({err})") from None
    if mode not in MODES:
        raise UserError(f"{path}: image mode {mode} is not 8-bit (allowed: {', '.join(sorted(MODES))}); convert it")
