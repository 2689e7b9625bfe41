"""The files a run writes, and loading someone else's weights with a report.

Every file is written to a temporary name in the same folder, flushed to
disk, then renamed over the old one (os.replace): a crash mid-save leaves
the previous file whole, never half of a new one.

Nothing is loaded with pickle's full power: torch.load(weights_only=True)
refuses a file that would run code, and safetensors holds no code at all.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import UserError

PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and by torch.compile


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a new temporary file beside `path`, then rename it over `path` in one step.

    Mode "x" makes a new file or fails, so nothing is written through a link
    left at that name; os.replace then replaces a link at `path` itself.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_weights(path: Path, model: nn.Module) -> None:
    """best.pt: a plain state_dict that torch.load(weights_only=True) reads anywhere."""
    atomic_write(path, torch_bytes({k: v.detach().cpu() for k, v in model.state_dict().items()}))


def load_full(path: Path) -> dict[str, Any]:
    """last.ckpt, as train.fit writes it: everything --resume needs."""
    checkpoint = torch_load(path)
    needed = {"epoch", "model", "optimizer", "rng", "config", "history", "best"}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys() or not isinstance(checkpoint["epoch"], int):
        raise UserError(f"{path} is not a full checkpoint of this project (it needs {', '.join(sorted(needed))})")
    return checkpoint


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"{path}: refused, it holds more than tensors (weights_only loading: {first})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"{path}: not a readable torch file ({str(err).splitlines()[0]})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or a torch file, opened out of a {"model": ...} (or state_dict...) wrapper."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--init {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise UserError(f"--init {path}: not a readable safetensors file ({err})") from None
    data = torch_load(path)
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"--init {path}: holds no state_dict of tensors")
    return data


def load_matching(
    model: nn.Module, source: dict[str, torch.Tensor], min_fraction: float, first_n: int = 0
) -> dict[str, list[str]]:
    """Exercise 4: loading weights that fit, with a report.

    Copy the tensors of `source` whose name (a PREFIXES prefix stripped) and
    shape match the model's; return {"loaded", "wrong shape", "wrong dtype",
    "missing", "unused"} lists of names (and "skipped (first_n)": only the first
    first_n matches load, in the model's order). Must hold: no integer tensor
    into a float one; when what loads (after first_n) is under min_fraction of
    the model's state_dict tensors, UserError before the model changes. Not
    the habit: load_state_dict(strict=False), which skips every mismatch in
    silence ("module." keys: all of them).
    """
    raise NotImplementedError("exercise 4: checkpoint.load_matching is not written yet")


def summary(report: dict[str, list[str]]) -> str:
    """One line: how many of each kind, with the first names of each problem."""
    return "; ".join(
        f"{len(names)} {kind}" + ("" if kind == "loaded" else f" ({', '.join(names[:3])}{', ...' * (len(names) > 3)})")
        for kind, names in report.items()
        if names
    )
