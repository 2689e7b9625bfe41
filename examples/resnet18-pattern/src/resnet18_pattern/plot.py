"""`resnet18_pattern plot DIR`: a run's loss and accuracy per epoch, drawn to DIR/curves.png; lr-find's curve."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import torch

from .checkpoint import atomic_path


class PlotError(RuntimeError):
    pass


def read_metrics(folder: Path) -> list[dict[str, float]]:
    path = folder / "metrics.csv"
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {folder} a run folder?")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(f)]
    except (UnicodeDecodeError, ValueError, TypeError, csv.Error) as err:
        why = err.reason if isinstance(err, UnicodeDecodeError) else err
        raise PlotError(f"{path} is not a metrics.csv as a run writes it: numbers under a header ({why})") from None
    if not rows or "epoch" not in rows[0]:
        raise PlotError(f"{path} holds no finished epoch yet")
    return rows


def unfreeze_epochs(rows: list[dict[str, float]]) -> list[int]:
    """Epochs that trained more parameters than the epoch before: where a stage unfroze."""
    return [
        int(now["epoch"])
        for before, now in zip(rows, rows[1:], strict=False)
        if now.get("trainable_params", 0) > before.get("trainable_params", 0)
    ]


def figure_class() -> type:
    try:
        # The Figure API, not pyplot: no GUI backend, no global state to disturb.
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)") from None
    return Figure


def plot_run(folder: str | Path) -> Path:
    """Write folder/curves.png: loss (left) and accuracy (right), train and val, unfreezes marked."""
    Figure = figure_class()
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    rows = read_metrics(folder)
    epochs = [int(row["epoch"]) for row in rows]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    for axes, metric in ((loss_axes, "loss"), (acc_axes, "acc")):
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            if all(key in row for row in rows):
                axes.plot(epochs, [row[key] for row in rows], marker="o", label=split)
        for i, epoch in enumerate(unfreeze_epochs(rows)):
            axes.axvline(epoch, color="grey", linestyle="--", label="unfreeze" if i == 0 else None)
        axes.set_xlabel("epoch")
        axes.set_title("loss" if metric == "loss" else "accuracy")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(folder.resolve().name)
    out = folder / "curves.png"
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return out


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path) -> Path:
    """A labelled heatmap of the counts: rows the true class, columns the predicted one."""
    Figure = figure_class()
    n = len(classes)
    side = max(4.0, 0.45 * n + 2)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(confusion.numpy(), cmap="Blues")
    axes.set_xticks(range(n), classes, rotation=90)
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if n <= 30:  # beyond that the numbers no longer fit their cells
        for (i, j), count in zip(itertools.product(range(n), range(n)), confusion.flatten().tolist(), strict=True):
            axes.text(j, i, str(count), ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def plot_lr_find(rows: list[dict[str, float]], suggestion: float | None, path: Path) -> Path:
    """lr-find's loss against the lr (log scale), raw and smoothed, the suggestion marked."""
    Figure = figure_class()
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    lrs = [row["lr"] for row in rows]
    axes.plot(lrs, [row["loss"] for row in rows], alpha=0.3, label="loss")
    axes.plot(lrs, [row["smoothed_loss"] for row in rows], label="smoothed")
    if suggestion is not None:
        axes.axvline(suggestion, color="grey", linestyle="--", label=f"suggested {suggestion:.2e}")
    axes.set_xscale("log")
    # The blow-up at the end would flatten the part worth reading.
    lowest = min(row["smoothed_loss"] for row in rows)
    axes.set_ylim(min(row["loss"] for row in rows) * 0.9, max(2 * lowest, rows[0]["smoothed_loss"] * 1.1))
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path
