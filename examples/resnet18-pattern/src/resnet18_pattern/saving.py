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
    CheckpointError,
    RunFiles,
    atomic_write,
    config_hash,
    non_finite,
    read_state_dict,
    safetensors_bytes,
    torch_bytes,
    torch_load,
)
from .distributed import gather
from .freeze import manifest
from .rng import rng_state

if TYPE_CHECKING:
    import torch

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
    "val_loss_ema",
    "val_acc_ema",
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
    bad += [f"the EMA of {name}" for name in non_finite(run.ema.shadow)] if run.ema is not None else []
    if bad:
        raise DivergedError(
            f"epoch {row['epoch']}: {len(bad)} tensors are not finite (first: {bad[0]}); "
            "nothing of this epoch was saved"
        )
    monitor, mode = run.config.checkpoint.monitor, run.config.checkpoint.mode
    value = row[monitor]
    if value < run.best_value if mode == "min" else value > run.best_value:
        run.best_value = value
        if run.world.main:
            save_best(run, row["epoch"], monitor, value)
    if run.ema is not None and run.world.main:
        save_ema(run, row)
    # Every rank's RNG, so each rank of a resumed run draws what it would have.
    rng = gather(rng_state(), run.world)
    if not run.world.main:
        return
    checkpoint = {
        "epoch": row["epoch"],
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng,
        "best_value": run.best_value,
        "history": run.history,
        "freeze_manifest": manifest(run.model, run.state, run.groups),
        "integrity": run.integrity.recorded(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "config": run.config.to_dict(),
        "classes": run.classes,
        "data": run.data_record,
    }
    save_full(run.files, checkpoint, run.config.checkpoint.keep_last_k)
    if row["epoch"] in run.state.stage_epochs and run.world.main:
        # A stage began this epoch: its freeze state is written with the epoch's files, so a run
        # stopped or diverged in that epoch never leaves a manifest ahead of what it saved.
        write_json(run.out / "freeze_manifest.json", manifest(run.model, run.state, run.groups))
    run.saved = row["epoch"]


def save_best(run: Run, epoch: int, monitor: str, value: float) -> None:
    info = {"epoch": epoch, "metric": {monitor: value}}
    # An _ema metric was measured on the averaged weights: they are the best.
    averaged = monitor.endswith("_ema")
    weights = run.ema.weights(run.model) if averaged else run.model.state_dict()
    # safetensors metadata is str -> str.
    metadata = {
        "epoch": str(epoch),
        monitor: repr(value),
        "config_sha256": config_hash(run.config.to_dict()),
        "classes": json.dumps(run.classes),
    }
    run.files.save("best.safetensors", safetensors_bytes(weights, metadata), {**info, "format": "safetensors"})


def save_ema(run: Run, row: dict[str, float]) -> None:
    """ema.safetensors: this epoch's averaged weights, a plain state_dict a model built without this project loads."""
    info = {"epoch": row["epoch"], "metric": {key: row[key] for key in ("val_loss_ema", "val_acc_ema")}}
    weights = run.ema.weights(run.model)
    metadata = {"epoch": str(row["epoch"]), "classes": json.dumps(run.classes)}
    run.files.save("ema.safetensors", safetensors_bytes(weights, metadata), {**info, "format": "safetensors"})


def find_best(folders: list[Path], epoch: int, where: str) -> Path:
    """The file holding the weights of `epoch`, the best so far, checked against checkpoints.json.

    best.* when it holds that epoch; else a kept epoch-NNNN.ckpt of it. A
    resume from an earlier checkpoint (or one after a kill during a save)
    can find best.* already holding a later epoch.
    """
    names = ["best.safetensors", f"epoch-{epoch:04d}.ckpt"]
    for folder in folders:
        files = RunFiles(folder)
        for name in names:
            if name in files.files and files.verify(name)["epoch"] == epoch:
                return folder / name
    raise CheckpointError(
        f"{where}: no file holds the best weights so far, of epoch {epoch} (looked for {', '.join(names)} in "
        f"{', '.join(map(str, folders))}); set restore_best = false to go on without them"
    )


def read_weights(path: Path, averaged: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict from best.* or from a full checkpoint's model (its EMA when `averaged`)."""
    if path.suffix != ".ckpt":
        return read_state_dict(path)
    checkpoint = torch_load(path)
    if averaged:
        return {**checkpoint["model"], **checkpoint["ema"]["shadow"]}
    return checkpoint["model"]


def best_files(run: Run) -> list[Path]:
    """The best weights, for the trackers: one file, the format every loader reads first."""
    names = ["best.safetensors"]
    return [run.out / name for name in names if (run.out / name).exists()][:1]


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
