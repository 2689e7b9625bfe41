"""Datasets: a learnable synthetic set that needs no download, or an image folder.

An image folder either has train/ and val/ of class folders, or is one
folder of class folders that is split here: stratified, seeded by
train.seed, data.val_fraction of each class validating. The split is saved
in the run folder (split.json) and a resume or evaluate reads it back, so
an image that validated never trains, even after images are added.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DEFAULT_DATA, Config
from .model import preprocessing


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


def image_transforms(image_size: int, augment: bool, prep: dict | None = None):
    """(train, val) transforms: the model's own preprocessing (or `prep`, an export's record of it) at `image_size`.

    Validation resizes so that a centre crop of `image_size` keeps the share
    of the image the weights were trained on (crop_fraction), then normalises
    with their mean and std. Training (when `augment`) takes random crops of
    35-100% of the image, resized to `image_size`, and flips half of them.
    """
    from torchvision import transforms

    prep = prep or preprocessing()
    mode = transforms.InterpolationMode(prep["interpolation"])
    normalize = transforms.Normalize(prep["mean"], prep["std"])
    resize = resize_side(image_size, prep["crop_fraction"])
    val = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=mode),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    if not augment:
        return val, val
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0), interpolation=mode),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, val


def resize_side(image_size: int, crop_fraction: float) -> int:
    """The shorter side validation resizes to, so that a centre crop of `image_size` keeps `crop_fraction`."""
    # Rounded down, as timm does; the epsilon keeps 224 / (224 / 256) at 256.
    return math.floor(image_size / crop_fraction + 1e-6)


def preprocessing_record(image_size: int) -> dict:
    """How validation prepares an image at `image_size`, as an export records it for predict (and other runtimes).

    Resize the shorter side to `resize` (with `interpolation`), centre-crop
    `image_size` square, scale to [0, 1], then normalise with `mean` and `std`.
    """
    prep = dict(preprocessing())
    return {"image_size": image_size, "resize": resize_side(image_size, prep["crop_fraction"]), **prep}


# Modes PIL turns into RGB without loss; a 16-bit ("I;16", "I") or float ("F")
# image would saturate to 0 and 255 on the way, so it is refused by name.
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}


def require_eight_bits(mode: str) -> None:
    if mode not in EIGHT_BIT_MODES:
        raise ValueError(f"mode {mode} is not 8 bits a channel; convert it to 8-bit RGB or grayscale")


def load_rgb(path: str):
    """torchvision's loader, with the file's name in the error."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            require_eight_bits(image.mode)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read the image ({err})") from None


def decode_cheaply(path: str) -> None:
    """Decode every byte of the image, at the smallest scale the format allows.

    Image.verify() reads headers only: a truncated JPEG or a PNG whose pixel
    data is corrupt passes it and fails in the middle of an epoch. draft()
    lets a JPEG decode at 1/8 scale, which still reads every coded block.
    """
    from PIL import Image

    with Image.open(path) as image:
        require_eight_bits(image.mode)
        image.draft("RGB", (1, 1))
        image.load()


def checked_folder(folder: Path, transform, bad_images: str) -> Dataset:
    """An ImageFolder whose classes all hold images and whose images all open.

    Every file is decoded once, up front (cheaply: decode_cheaply), so a
    broken file fails (or, with bad_images = "skip", is left out) before the
    run folder exists, not hours into training.
    """
    from torchvision import datasets

    check_links(folder)
    try:
        dataset = datasets.ImageFolder(folder, transform=transform, loader=load_rgb, allow_empty=True)
    except FileNotFoundError:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<class>/<image>") from None
    skip = bad_images == "skip"
    advice = '; [data] bad_images = "skip" trains without it'
    counts = [0] * len(dataset.classes)
    for _, target in dataset.samples:
        counts[target] += 1
    for name, count in zip(dataset.classes, counts, strict=True):
        if count == 0:
            problem = f"{folder / name} holds no images (extensions: {', '.join(datasets.folder.IMG_EXTENSIONS)})"
            if not skip:
                raise DataError(problem + advice)
            print(f"warning: {problem}; the class keeps its index but has no examples here", file=sys.stderr)
    bad: dict[str, str] = {}  # path -> why it does not decode
    for path, _ in dataset.samples:
        try:
            decode_cheaply(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a broken file
            bad[path] = f"{type(err).__name__}: {err}"
    if bad:
        more = " ..." if len(bad) > 5 else ""
        named = "; ".join(f"{path} ({why})" for path, why in list(bad.items())[:5])
        problem = f"{len(bad)} unreadable image(s) in {folder}: {named}{more}"
        if not skip:
            raise DataError(problem + advice)
        print(f"warning: skipping {problem}", file=sys.stderr)
        dataset.samples = [sample for sample in dataset.samples if sample[0] not in bad]
        dataset.imgs = dataset.samples
        dataset.targets = [target for _, target in dataset.samples]
    return dataset


def check_links(folder: Path) -> None:
    """Refuse, by name, a link in a class folder that is a folder (a loop, or images counted twice) or leaves it.

    ImageFolder follows links: one back to a parent lists every image again
    under this class, and two such loops never end.
    """
    for class_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        inside = class_dir.resolve()
        for top, dirs, files in os.walk(class_dir):  # links to folders are listed, not followed
            for name in dirs + files:
                path = Path(top) / name
                if not path.is_symlink():
                    continue
                target = path.resolve()
                if path.is_dir():
                    why = "a loop back to a folder above it" if inside.is_relative_to(target) else "a link to a folder"
                elif not target.is_relative_to(inside):
                    why = f"a link to {target}, outside its class folder {class_dir}"
                else:
                    continue
                raise DataError(f"{path} is {why}; a class folder holds its own images (copy the files in)")


def image_folder_datasets(
    root: str | Path, image_size: int, num_classes: int, augment: bool = True, bad_images: str = "error"
) -> tuple[Dataset, Dataset]:
    """`root/train/<class>/*` and `root/val/<class>/*`, in torchvision's ImageFolder layout."""
    if bad_images not in ("error", "skip"):
        raise DataError(f'[data] bad_images must be "error" or "skip", got {bad_images!r}')
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise DataError("reading an image folder needs torchvision: pip install -e '.[images]'") from None
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"{root / split} is not a directory; expected "
                f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
            )
    train_tf, val_tf = image_transforms(image_size, augment)
    train = checked_folder(root / "train", train_tf, bad_images)
    val = checked_folder(root / "val", val_tf, bad_images)
    if train.classes != val.classes:
        raise DataError(f"{root}: train classes {train.classes} differ from val classes {val.classes}")
    check_classes(root / "train", train.classes, num_classes)
    return train, val


def check_classes(folder: Path, classes: list[str], num_classes: int) -> None:
    if len(classes) != num_classes:
        raise DataError(
            f"{folder} has {len(classes)} classes but the model has num_classes = {num_classes}; "
            "set [model] num_classes to the folder's count, or leave it out of --config and --set: train then takes it"
        )


def folder_classes(data: str) -> tuple[Path, list[str]] | None:
    """The folder whose class folders name the classes of --data (train/ of a split one), and their names.

    None for synthetic data or a folder that is not there (make_datasets names it).
    Sorted folder names, as ImageFolder finds them, so the count is the one check_classes compares.
    """
    root = Path(data)
    if data == DEFAULT_DATA or not root.is_dir():
        return None
    folder = root / "train" if (root / "train").is_dir() or (root / "val").is_dir() else root
    if not folder.is_dir():
        return None
    return folder, sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def count_classes_from(data: str, config: Config) -> None:
    """Set model.num_classes to the class count of the --data folder: train's rule when no --config or --set gives it.

    The run's config.toml then records that count, so evaluate, predict,
    export and --resume build the same head. Synthetic data keeps the config's.
    """
    found = folder_classes(data)
    if found is None:
        return
    folder, classes = found
    if len(classes) < 2:
        held = f"only {folder / classes[0]}" if classes else "no class folders"
        raise DataError(f"{folder} holds {held}; a classifier needs 2 or more, as {folder}/<class>/<image>")
    config.model.num_classes = len(classes)


class SplitPart(Subset):
    """One side of a one-folder split, with the folder's class names and the split itself."""

    def __init__(self, folder: Any, indices: list[int], split: dict[str, Any]) -> None:
        super().__init__(folder, indices)
        self.classes, self.split = folder.classes, split


def split_folder(root: Path, files: dict[str, int], classes: list[str], fraction: float, seed: int) -> dict:
    """Per class, round(fraction x its images) of them (at least one, never all) validate."""
    by_class: dict[int, list[str]] = {}
    for name, target in files.items():
        by_class.setdefault(target, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    split: dict[str, Any] = {"root": str(root), "val_fraction": fraction, "seed": seed, "train": [], "val": []}
    for target, name in enumerate(classes):
        names = sorted(by_class.get(target, []))
        if len(names) < 2:
            raise DataError(f"{root / name} has {len(names)} image(s); a class needs 2 or more to be in train and val")
        order = torch.randperm(len(names), generator=generator).tolist()
        count = min(len(names) - 1, max(1, round(len(names) * fraction)))
        split["val"] += sorted(names[i] for i in order[:count])
        split["train"] += sorted(names[i] for i in order[count:])
    return split


def saved_split(folder: Path, data: str | None = None) -> dict | None:
    """The one-folder split a run saved in `folder` (its split.json), if any; with `data`, only a split of it."""
    path = folder / "split.json"
    if not path.is_file():
        return None
    try:
        split = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not JSON ({err})") from None
    if not isinstance(split, dict) or not {"root", "train", "val"} <= split.keys():
        raise DataError(f"{path} is not a split (root, train and val lists)")
    if data is not None and Path(split["root"]).resolve() != Path(data).resolve():
        return None
    return split


def one_folder_datasets(root: Path, config: Config, saved: dict | None) -> tuple[Dataset, Dataset]:
    """root/<class>/* split into train and val: as `saved` says, else anew."""
    train_tf, val_tf = image_transforms(config.train.image_size, config.data.augment)
    folder = checked_folder(root, train_tf, config.data.bad_images)
    check_classes(root, folder.classes, config.model.num_classes)
    files = {str(Path(path).relative_to(root)): i for i, (path, _) in enumerate(folder.samples)}
    targets = {name: folder.samples[i][1] for name, i in files.items()}
    split = saved or split_folder(root, targets, folder.classes, config.data.val_fraction, config.train.seed)
    gone = [name for name in split["train"] + split["val"] if name not in files]
    if gone:
        raise DataError(f"{root}: {len(gone)} image(s) of the run's split are gone (first: {gone[0]})")
    val_folder = copy.copy(folder)
    val_folder.transform = val_tf
    train = SplitPart(folder, [files[name] for name in split["train"]], split)
    return train, SplitPart(val_folder, [files[name] for name in split["val"]], split)


def make_datasets(data: str, config: Config, split: dict | None = None) -> tuple[Dataset, Dataset]:
    """The (train, val) datasets of --data; `split` is a one-folder split to reuse (a run's split.json)."""
    train_cfg, data_cfg = config.train, config.data
    if data == DEFAULT_DATA:
        return synthetic_datasets(
            config.model.num_classes,
            train_cfg.image_size,
            data_cfg.synthetic_train_size,
            data_cfg.synthetic_val_size,
            seed=train_cfg.seed,
        )
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data}: no such directory (or use --data synthetic)")
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        train, val = one_folder_datasets(root, config, split)
    else:
        train, val = image_folder_datasets(
            data,
            train_cfg.image_size,
            config.model.num_classes,
            augment=data_cfg.augment,
            bad_images=data_cfg.bad_images,
        )
    for side, dataset in (("train", train), ("val", val)):
        if len(dataset) == 0:
            raise DataError(f"--data {data}: the {side} side has no images left to use")
    return train, val


# How much of each image the fingerprint reads: all of a small one, the header and first rows of a large one.
HEAD_BYTES = 1 << 16


def data_record(data: str, train: Dataset, val: Dataset) -> dict[str, Any]:
    """What a run trains on: --data, and per side a fingerprint of the images it uses (path, size, label, first bytes).

    Saved as RUN/data.json and in each full checkpoint; a resume on other
    data, or on an edited split.json, is refused by it. Data held in memory
    (synthetic) has no files: its config is its fingerprint.
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
    """`count` inputs like --data synthetic's: what the tests feed the model."""
    train, _ = synthetic_datasets(config.model.num_classes, config.train.image_size, count, 1)
    return torch.stack([train[i][0] for i in range(count)])
