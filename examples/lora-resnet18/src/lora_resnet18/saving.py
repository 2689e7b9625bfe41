"""What each epoch leaves in the run folder: metrics.csv, the best weights, the full checkpoints.

Every file is written whole to a temp file and moved into place, so a crash
leaves the previous file; weights that are not finite are never written.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    RunFiles,
    atomic_write,
    config_hash,
    non_finite,
    safetensors_bytes,
    torch_bytes,
)
from .freeze import manifest
from .lora import ADAPTER_FILE, adapter_state_dict, base_sha256, merged_state_dict, scale_metadata
from .rng import rng_state

if TYPE_CHECKING:
    from .run import Run


class DivergedError(RuntimeError):
    """The loss or the weights stopped being finite: nothing of that epoch is saved."""


# New columns go at the end: scripts that read metrics.csv by position keep working.
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "train_acc",
    "images_per_s",
    "trainable_params",
)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    # Rewritten whole from the history each epoch, so a resumed run never
    # holds rows from epochs it went back over.
    write_csv(path, METRIC_COLUMNS, history)


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, float]]) -> Path:
    """`rows` under a header of `columns`, written atomically (a missing key is an empty cell)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    return path


def save(run: Run, row: dict[str, float]) -> None:
    """best.* when the monitored metric improved; last.ckpt and the epoch files, every epoch.

    Weights that are not finite are never written: the files of the last good epoch stay.
    """
    bad = non_finite(run.model.state_dict())
    if bad:
        raise DivergedError(
            f"epoch {row['epoch']}: {len(bad)} tensors are not finite (first: {bad[0]}); "
            "nothing of this epoch was saved"
        )
    monitor, mode = run.config.checkpoint.monitor, run.config.checkpoint.mode
    value = row[monitor]
    if value < run.best_value if mode == "min" else value > run.best_value:
        run.best_value = value
        save_best(run, row["epoch"], monitor, value)
    # Every rank's RNG, so each rank of a resumed run draws what it would have.
    rng = [rng_state()]
    checkpoint = {
        "epoch": row["epoch"],
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": {},
        "rng": rng,
        "best_value": run.best_value,
        "history": run.history,
        "freeze_manifest": manifest(run.model, run.state, run.groups),
        "integrity": run.integrity.recorded(),
        "config": run.config.to_dict(),
        "classes": run.classes,
        "data": run.data_record,
    }
    save_full(run.files, checkpoint, run.config.checkpoint.keep_last_k)
    if row["epoch"] in run.state.stage_epochs:
        # A stage began this epoch: its freeze state is written with the epoch's files, so a run
        # stopped or diverged in that epoch never leaves a manifest ahead of what it saved.
        write_json(run.out / "freeze_manifest.json", manifest(run.model, run.state, run.groups))
    run.saved = row["epoch"]


def save_best(run: Run, epoch: int, monitor: str, value: float) -> None:
    info = {"epoch": epoch, "metric": {monitor: value}}
    weights = run.model.state_dict()
    # safetensors metadata is str -> str.
    metadata = {
        "epoch": str(epoch),
        monitor: repr(value),
        "config_sha256": config_hash(run.config.to_dict()),
        "classes": json.dumps(run.classes),
    }
    adapter = adapter_state_dict(run.model, weights)
    recorded = {**metadata, **scale_metadata(run.model), "lora_base_sha256": base_sha256(weights, adapter)}
    run.files.save(ADAPTER_FILE, safetensors_bytes(adapter, recorded), {**info, "format": "lora_adapter"})
    # best.* is what a model built without peft loads: each weight with its update merged in.
    weights = merged_state_dict(run.model)
    run.files.save("best.pt", torch_bytes(weights), {**info, "format": "state_dict"})
    run.files.save("best.safetensors", safetensors_bytes(weights, metadata), {**info, "format": "safetensors"})


def full_info(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What checkpoints.json records for a full checkpoint, read off the checkpoint itself."""
    last = checkpoint["history"][-1]
    return {"epoch": checkpoint["epoch"], "metric": {k: last[k] for k in ("val_loss", "val_acc")}, "format": "full"}


# The epoch files pruning may delete: a plain name in the run folder, nothing else.
EPOCH_FILE = re.compile(r"epoch-\d{4,}\.ckpt")


def save_full(files: RunFiles, checkpoint: dict[str, Any], keep_last_k: int) -> None:
    """last.ckpt, plus epoch-NNNN.ckpt files of which the newest keep_last_k stay.

    epoch-0003.ckpt holds the state after epoch 3 (as numbered in
    metrics.csv), so resuming from it runs epoch 4 next. An old epoch file is
    deleted only after the new one is complete.
    """
    payload = torch_bytes(checkpoint)
    info = full_info(checkpoint)
    if keep_last_k:
        files.save(f"epoch-{checkpoint['epoch']:04d}.ckpt", payload, info)
        epoch_files = sorted((name for name in files.files if EPOCH_FILE.fullmatch(name)), key=lambda n: int(n[6:-5]))
        for name in epoch_files[:-keep_last_k]:
            files.remove(name)
    # A second copy, not a hard link to the newest epoch file: damage to one
    # name (a bad sector, an edit) must leave the other to resume from.
    files.save("last.ckpt", payload, info)
