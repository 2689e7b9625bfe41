"""evaluate's report: accuracy overall and per class, top-k accuracy, precision, recall, the confusion matrix.

A person gets a table; `--json` gives plain JSON, where a ratio with nothing
to divide by (precision of a class nothing was predicted as, a class
without images) is null, never NaN, so every JSON reader takes it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write


@torch.no_grad()
def confusion_matrix(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, k: int
) -> tuple[torch.Tensor, float, float]:
    """Counts[true, predicted], the mean cross-entropy, and the share of labels within the top k."""
    model.eval()
    confusion: torch.Tensor | None = None
    loss, in_top_k, count = 0.0, 0, 0
    for inputs, labels in loader:
        logits = model(inputs.to(device)).float().cpu()
        n = logits.shape[1]
        pairs = torch.bincount(labels * n + logits.argmax(1), minlength=n * n).reshape(n, n)
        confusion = pairs if confusion is None else confusion + pairs
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        in_top_k += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
        count += len(labels)
    if confusion is None:
        raise ValueError("evaluate needs at least one example")
    return confusion, loss / count, in_top_k / count


def ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def report(confusion: torch.Tensor, classes: list[str], loss: float, k: int, top_k: float) -> dict[str, Any]:
    """The numbers a person looks at; recall is a class's own accuracy (its images that were called it)."""
    hits, images, called = confusion.diag().tolist(), confusion.sum(1).tolist(), confusion.sum(0).tolist()
    per_class = [
        {
            "class": name,
            "images": images[i],
            "accuracy": ratio(hits[i], images[i]),
            "precision": ratio(hits[i], called[i]),
            "recall": ratio(hits[i], images[i]),
        }
        for i, name in enumerate(classes)
    ]
    total = int(confusion.sum())
    return {"val_loss": loss, "val_acc": sum(hits) / total, "top_k": k, "val_top_k_acc": top_k, "per_class": per_class}


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float made None (JSON null), at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_null(item) for item in value]
    return value


def table(result: dict[str, Any]) -> str:
    """The report for a terminal: the totals, then a row per class in the per_class.csv column order."""
    top_k = f"  top-{result['top_k']} acc {result['val_top_k_acc']:.4f}" if result["top_k"] > 1 else ""
    lines = [f"{result['weights']}: val_loss {result['val_loss']:.4f}  val_acc {result['val_acc']:.4f}{top_k}", ""]
    width = max(len("class"), *(len(row["class"]) for row in result["per_class"]))
    lines.append(f"{'class':<{width}}  {'images':>6}  {'accuracy':>8}  {'precision':>9}  {'recall':>6}")
    for row in result["per_class"]:
        cells = ["-" if row[c] is None else f"{row[c]:.3f}" for c in ("accuracy", "precision", "recall")]
        lines.append(f"{row['class']:<{width}}  {row['images']:>6}  {cells[0]:>8}  {cells[1]:>9}  {cells[2]:>6}")
    lines += [f"wrote {path}" for path in result.get("files", [])]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def write_report(folder: Path, result: dict[str, Any], confusion: torch.Tensor, classes: list[str]) -> list[Path]:
    """per_class.csv and confusion.csv (rows: true class, columns: predicted) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["class", "images", "accuracy", "precision", "recall"]
    write_csv(folder / "per_class.csv", columns, [[row[c] for c in columns] for row in result["per_class"]])
    matrix = [[name, *counts] for name, counts in zip(classes, confusion.tolist(), strict=True)]
    write_csv(folder / "confusion.csv", ["true \\ predicted", *classes], matrix)
    return [folder / "per_class.csv", folder / "confusion.csv"]
