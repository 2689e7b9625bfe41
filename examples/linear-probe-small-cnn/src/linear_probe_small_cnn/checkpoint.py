"""Reading and writing weights and checkpoints, safely.

Reading never runs code from a file: torch files load with weights_only=True
and there is no fallback to unsafe loading. Writing is atomic: a file is
written next to its destination, flushed to disk, then renamed over it, so a
crash mid-save leaves the previous good file, never a torn one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

# Wrappers other tools put around a state_dict, and prefixes they add to keys:
# DataParallel/DDP add "module.", torch.compile adds "_orig_mod.".
NESTED_KEYS = ("state_dict", "model", "model_state")
PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    pass


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temp file in the same directory and os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too, or a power cut can undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; every failure becomes a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    _check_zip_records(path, size)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            # Refused by the weights_only unpickler: the file wants to build
            # arbitrary Python objects. Nothing from it has run.
            raise CheckpointError(
                f"{path} ({size} bytes) was refused: loading it would run code from "
                f"{', '.join(unsafe)}. If you trust it, convert it once in a separate "
                "script: torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
            ) from None
        raise CheckpointError(f"{path} ({size} bytes) is damaged or not a torch file: {err}") from None
    except (RuntimeError, EOFError, IndexError, ValueError, KeyError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} ({size} bytes) is damaged or not a torch file: {type(err).__name__}: {err}"
        ) from None


def _check_zip_records(path: Path, size: int) -> None:
    # torch.save writes a zip whose records carry CRC-32s, but torch.load does
    # not check them: bytes zeroed by a bad disk would load as wrong weights.
    if not zipfile.is_zipfile(path):
        return  # torch.load says what is wrong with a file that is no zip
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path} ({size} bytes) is damaged: {err}") from None
    if bad is not None:
        raise CheckpointError(f"{path} ({size} bytes) is damaged: record {bad} fails its CRC-32 check")


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all: damaged, not hostile
        return []


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch file, unwrapped and with prefixes stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = torch_load(path)
    while isinstance(obj, dict):
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (a dict of tensors)")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} ({path.stat().st_size} bytes) is damaged: {err}") from None


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def fraction(self) -> float:
        total = len(self.loaded) + len(self.mismatched) + len(self.missing)
        return len(self.loaded) / max(total, 1)

    def format(self) -> str:
        lines = [f"init from {self.path}: {len(self.loaded)} tensors loaded ({self.fraction():.0%} of the model)"]
        for key, file_shape, model_shape in self.mismatched:
            lines.append(f"  shape mismatch, kept model init: {key} file {list(file_shape)} model {list(model_shape)}")
        for key in self.missing:
            lines.append(f"  missing from file, kept model init: {key}")
        for key in self.unexpected:
            lines.append(f"  in file but not in model, ignored: {key}")
        return "\n".join(lines)


def load_matching(model: nn.Module, path: str | Path, min_loaded_fraction: float) -> LoadReport:
    """Load every tensor whose name and shape match; report everything else.

    load_state_dict(strict=False) alone skips keys without a word and still
    raises on a shape mismatch; this loads what fits and says what did not.
    """
    source = read_state_dict(path)
    target = model.state_dict()
    report = LoadReport(str(path))
    matched = {}
    for key, value in target.items():
        if key not in source:
            report.missing.append(key)
        elif source[key].shape != value.shape:
            report.mismatched.append((key, tuple(source[key].shape), tuple(value.shape)))
        else:
            matched[key] = source[key]
            report.loaded.append(key)
    report.unexpected = [key for key in source if key not in target]
    if report.fraction() < min_loaded_fraction:
        raise CheckpointError(
            f"{report.format()}\nonly {report.fraction():.0%} of the model's tensors match "
            f"{path}; refusing to train from it (init.min_loaded_fraction = {min_loaded_fraction})"
        )
    model.load_state_dict(matched, strict=False)
    return report
