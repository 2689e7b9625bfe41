"""predict: class names and probabilities for image files, through the weights' own preprocessing.

Images go through the validation transform (no augmentation) in batches of
a DataLoader. A file that does not open is named and skipped, not fatal: one
broken file must not cost the other ten thousand answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .data import DataError, image_transforms, load_rgb
from .distributed import SINGLE
from .evaluation import write_csv
from .run import loader_workers

COLUMNS = ("path", "rank", "label", "probability")


def image_files(paths: list[str]) -> list[Path]:
    """Each path that is a file, and the images under each folder (recursively, sorted)."""
    try:
        from torchvision.datasets.folder import IMG_EXTENSIONS
    except ImportError:
        raise DataError("reading images needs torchvision: pip install -e '.[images]'") from None

    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"no images in {', '.join(paths)} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return files


def predict_workers(setting: int | str) -> int:
    """train.num_workers for predict; "auto" keeps the decoding in this process on 2 cores or fewer.

    There a loader worker takes a core from the model's threads: 0.89-0.94x
    the images/s of a bare loop with one worker, 1.01-1.04x without it
    (bench/predict_throughput.py, resnet18 on 2 cores).
    """
    if setting == "auto" and (os.cpu_count() or 1) <= 2:
        return 0
    return loader_workers(setting, "images", SINGLE)


class ImageFiles(Dataset):
    """Each file as a tensor, or the line saying why it does not open."""

    def __init__(self, files: list[Path], prep: dict) -> None:
        self.files = files
        self.transform = image_transforms(prep["image_size"], augment=False, prep=prep)[1]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | str, int]:
        try:
            return self.transform(load_rgb(str(self.files[index]))), index
        except DataError as err:
            return str(err), index


def collate(items: list[tuple[torch.Tensor | str, int]]) -> tuple[torch.Tensor | None, list[int], list[str]]:
    """A batch of the images that opened, their indices, and the errors of those that did not."""
    good = [(x, i) for x, i in items if isinstance(x, torch.Tensor)]
    bad = [x for x, _ in items if isinstance(x, str)]
    inputs = torch.stack([x for x, _ in good]) if good else None
    return inputs, [i for _, i in good], bad


@torch.no_grad()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    files: list[Path],
    classes: list[str],
    prep: dict,
    top_k: int,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> tuple[list[dict], list[str]]:
    """The top_k (label, probability) rows of every image, and a line for each one skipped.

    `model` is a model in eval mode, or an export that load_export ran;
    `prep` is how to prepare its images (data.preprocessing_record, or the export's).
    """
    loader = DataLoader(ImageFiles(files, prep), batch_size=batch_size, collate_fn=collate, num_workers=workers)
    rows: list[dict] = []
    skipped: list[str] = []
    for inputs, indices, bad in loader:
        skipped += bad
        if inputs is None:
            continue
        top = model(inputs.to(device)).float().softmax(1).topk(top_k, dim=1)
        for index, values, labels in zip(indices, top.values.tolist(), top.indices.tolist(), strict=True):
            path = str(files[index])
            for rank, (probability, label) in enumerate(zip(values, labels, strict=True), 1):
                rows.append({"path": path, "rank": rank, "label": classes[label], "probability": probability})
    return rows, skipped


def format_rows(rows: list[dict]) -> str:
    """A table for a terminal: one line per (image, rank)."""
    # The CSV's columns, in the CSV's order.
    width = max([len("path")] + [len(row["path"]) for row in rows])
    label = max([len("label")] + [len(row["label"]) for row in rows])
    lines = [f"{'path':<{width}}  rank  {'label':<{label}}  probability"]
    lines += [f"{r['path']:<{width}}  {r['rank']:>4}  {r['label']:<{label}}  {r['probability']:>11.4f}" for r in rows]
    return "\n".join(lines)


def write_predictions(path: Path, rows: list[dict]) -> None:
    """path,rank,label,probability; written whole or not at all."""
    write_csv(path, list(COLUMNS), [[row[column] for column in COLUMNS] for row in rows])
