"""Reading and writing checkpoint files, safely.

Reading never runs code from a file: torch files load with weights_only=True
and there is no fallback to unsafe loading. Writing is atomic: a file is
written next to its destination, flushed to disk, then renamed over it, so a
crash mid-save leaves the previous good file, never a torn one. Every file a
run writes is listed in the run's checkpoints.json with its SHA-256, so damage
that still unpickles is caught too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import secrets
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Wrappers other tools put around a state_dict, and prefixes they add to keys:
# DataParallel/DDP add "module.", torch.compile adds "_orig_mod.".
NESTED_KEYS = ("state_dict", "model", "model_state", "module")
PREFIXES = ("module.", "_orig_mod.")
MANIFEST = "checkpoints.json"
# The names a checkpoints.json may list: plain file names in its folder, never a path or a hidden file.
LISTED_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# What a plain legacy state_dict pickle imports, all of which weights_only loads.
WEIGHTS_ONLY_GLOBALS = ("torch._utils._rebuild_", "torch.FloatStorage", "torch.LongStorage", "torch.HalfStorage")
WEIGHTS_ONLY_GLOBALS += ("torch.BFloat16Storage", "torch.DoubleStorage", "torch.IntStorage", "collections.OrderedDict")


class CheckpointError(RuntimeError):
    pass


@contextlib.contextmanager
def atomic_path(path: Path, before_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temp path next to `path`; once the block is done, put it in place.

    The temp file is fsynced before the rename and the directory after it, so
    a crash or power cut leaves either the old file or the new one. An
    exception inside the block removes the temp file and keeps the old one.
    `before_replace` sees the complete temp file just before the rename.
    """
    path = Path(path)
    # The name is chosen before the try, so a Ctrl-C or SIGTERM (a
    # KeyboardInterrupt between any two bytecodes) that lands just after the
    # file is made still finds it to remove. O_EXCL: never open a file that
    # is already there; the mode is what umask allows, as for any file.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if not (isinstance(err, FileExistsError) and err.filename == str(tmp)):
            tmp.unlink(missing_ok=True)  # ours: a name taken already was not
        if isinstance(err, OSError):
            _raise_if_full(err, path)
        raise
    # The rename itself must reach the disk too, or a power cut can undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def leftover_temps(path: Path) -> list[Path]:
    """The temp files atomic_path made for `path` in processes killed before the rename: regular files only."""
    named = re.compile(re.escape(f".{path.name}.") + "[0-9a-f]" * 12 + re.escape(".tmp"))  # token_hex(6)
    candidates = path.parent.glob(f".{path.name}.*.tmp")
    return [p for p in candidates if named.fullmatch(p.name) and p.is_file() and not p.is_symlink()]


def _raise_if_full(err: OSError, path: Path) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CheckpointError(
            f"could not write {path}: {err.strerror}; the file it would replace, "
            "and every earlier file of the run, are intact"
        ) from None


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], Any], before_replace: Callable[[Path], None] | None = None
) -> None:
    """Write `path` through `write(file)` with the guarantees of atomic_path."""
    with atomic_path(path, before_replace) as tmp, open(tmp, "wb") as f:
        write(f)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """A short fingerprint of a run's config, stored with its weights."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class RunFiles:
    """A run folder's checkpoints.json: every file saved, with its SHA-256.

    Saving is write-ahead: the new file's hash enters the manifest before the
    rename, and the entry keeps the hash of the file it replaces (None for a
    new file) until the rename is done. Whatever moment a run is killed at,
    the file on disk matches one of the two hashes, or a new file is absent
    and forgotten, so what is listed can be checked and trusted.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.files: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                files = json.loads(self.path.read_text())["files"]
            except (ValueError, KeyError, TypeError):
                files = None
            # Each entry is read for its name, hash and epoch before any file is trusted.
            if not isinstance(files, dict) or not all(map(well_formed, files.values())):
                raise CheckpointError(
                    f"{self.path} is damaged: expected a table of files, each with its sha256, size and epoch, "
                    "as a run writes it; move it aside to use the folder's files unchecked"
                )
            strange = [name for name in files if not LISTED_NAME.fullmatch(name)]
            if strange:
                raise CheckpointError(
                    f"{self.path} lists {strange[0]!r}, not a plain file name in its folder "
                    "(letters, digits, '_', '-', '.'); move it aside to use the folder's files unchecked"
                )
            # A new file recorded by a run killed before its rename was never written: forget it.
            self.files = {
                name: entry
                for name, entry in files.items()
                if not ("replaces" in entry and entry["replaces"] is None and not (self.folder / name).is_file())
            }

    def save(self, name: str, data: bytes, info: dict[str, Any]) -> None:
        """Write `data` to `folder/name` atomically and record it with `info` (epoch, metric, format)."""

        def record(tmp: Path) -> None:
            entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **info}
            entry["torch"] = torch.__version__
            entry["written"] = datetime.now(UTC).isoformat(timespec="seconds")
            previous = self.files.get(name)
            # None marks a file that did not exist: killed before the rename, it never will.
            entry["replaces"] = None if previous is None else {k: v for k, v in previous.items() if k != "replaces"}
            self.files[name] = entry
            self._write()

        atomic_write(self.folder / name, lambda f: f.write(data), before_replace=record)
        self.files[name].pop("replaces", None)
        self._write()

    def remove(self, name: str) -> None:
        # Out of the manifest first: a file on disk that is not listed is
        # ignored, a listed file that is gone would be reported as missing.
        self.files.pop(name, None)
        self._write()
        (self.folder / name).unlink(missing_ok=True)

    def verify(self, name: str) -> dict[str, Any]:
        """The manifest entry that `folder/name` matches; CheckpointError when none does."""
        path = self.folder / name
        entry = self.files.get(name)
        if entry is None:
            raise CheckpointError(f"{path} is not listed in {self.path}")
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {self.path} but missing")
        actual = sha256(path)
        if actual == entry["sha256"]:
            return entry
        replaced = entry.get("replaces")
        if replaced is not None and actual == replaced["sha256"]:
            # The run stopped between recording a new file and renaming it
            # into place: what is on disk is the previous complete file.
            return replaced
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) does not match {self.path}: "
            f"SHA-256 {actual[:12]}..., recorded {entry['sha256'][:12]}... ({entry['size']} bytes)"
        )

    def _write(self) -> None:
        text = json.dumps({"files": self.files}, indent=2)
        atomic_write(self.path, lambda f: f.write(text.encode()))


def well_formed(entry: Any) -> bool:
    """A checkpoints.json entry as RunFiles.save writes it: sha256, size and a whole epoch number."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False
    return all(isinstance(entry.get(key), int) and not isinstance(entry.get(key), bool) for key in ("size", "epoch"))


def verify_in_run(path: str | Path) -> None:
    """A file the run folder's checkpoints.json lists must match it: changed since the run wrote it is refused.

    A file it does not list (one the user put there) is the user's own: not checked.
    """
    path = Path(path)
    if (path.parent / MANIFEST).is_file():
        files = RunFiles(path.parent)
        if path.name in files.files:
            files.verify(path.name)


def safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A state_dict as a .safetensors file, with string metadata.

    safetensors refuses tensors that share memory. Tied weights (one tensor
    under two names) are stored once; the metadata maps each dropped name to
    the kept one, and read_state_dict puts the alias back.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state_dict.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride())
        if value.numel() and identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().contiguous()
    if tied:
        metadata = {**metadata, "tied": json.dumps(tied)}
    return save(tensors, metadata=metadata)


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
                f"{path} ({size} bytes) was refused: loading it would run code from {', '.join(unsafe)}; "
                "only tensors and plain containers load here"
            ) from None
        # torch's own message goes on to advise weights_only=False, which would run the file: keep its reason only.
        reason = (str(err).rpartition("WeightsUnpickler error:")[2].strip().splitlines() or ["not a pickle"])[0]
        raise CheckpointError(f"{path} ({size} bytes) is damaged or not a torch file: {reason}") from None
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
    """The Python callables a torch file would import to load, read without running any."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: perhaps a legacy (pre-1.6) pickle
        pass
    # A legacy file is a run of plain pickles (then raw storage bytes): their
    # GLOBAL opcodes name what they would import.
    found: list[str] = []
    with contextlib.suppress(Exception), open(path, "rb") as f:
        for _pickle in range(5):  # magic number, protocol, system info, the object, storage keys; then raw bytes
            strings: list[str] = []
            for opcode, arg, _ in pickletools.genops(f):
                strings += [arg] if isinstance(arg, str) else []
                name = str(arg).replace(" ", ".") if opcode.name == "GLOBAL" else None
                if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = ".".join(strings[-2:])
                if name and not name.startswith(WEIGHTS_ONLY_GLOBALS):
                    found.append(name)
    return found


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch file, unwrapped and with prefixes stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        obj = torch_load(path)
    else:
        raise CheckpointError(
            f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or {', '.join(TORCH_SUFFIXES)}"
        )
    while isinstance(obj, dict):
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (a dict of tensors)")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} ({path.stat().st_size} bytes) is damaged: {err}") from None
    tied = metadata_json(path, metadata, "tied", "{}")
    if not isinstance(tied, dict) or not all(isinstance(k, str) and v in tensors for k, v in tied.items()):
        raise CheckpointError(
            f"{path}: its 'tied' metadata must map names to tensors the file holds, got {tied!r:.200}"
        )
    for alias, kept in tied.items():
        tensors[alias] = tensors[kept]
    return tensors


def metadata_json(path: Path, metadata: dict[str, str], key: str, default: str) -> Any:
    """A JSON value this template wrote into a .safetensors file's metadata; one line if it is not JSON."""
    try:
        return json.loads(metadata.get(key) or default)
    except ValueError as err:
        raise CheckpointError(f"{path}: its {key!r} metadata is not JSON ({err})") from None


def read_classes(path: str | Path) -> list[str] | None:
    """The class names saved with a weights file, or None where it has none.

    They are its own (safetensors metadata, a full checkpoint's "classes"),
    else those of the classes.json beside it (a plain best.pt has no room).
    """
    path = Path(path)
    names: Any = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        names = metadata_json(path, metadata, "classes", "null")
    elif path.suffix in TORCH_SUFFIXES:
        obj = torch_load(path)
        names = obj.get("classes") if isinstance(obj, dict) else None
    beside = path.parent / "classes.json"
    if names is None and beside.is_file():
        try:
            names = json.loads(beside.read_text())
        except ValueError as err:
            raise CheckpointError(f"{beside} is not JSON ({err})") from None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"the class names of {path} are not a list of strings: {names!r}")
    return names


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key.removeprefix(prefix), True
    return key


def find_resumable(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest full checkpoint in `folder` that matches its manifest, loaded.

    Every candidate that is skipped is printed with the reason.
    """
    files = RunFiles(folder)
    if not files.path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}, so nothing there can be resumed")
    candidates = [name for name, entry in files.files.items() if entry.get("format") == "full"]
    # Newest first; last.ckpt before the epoch file of the same epoch.
    candidates.sort(key=lambda name: (-files.files[name]["epoch"], name != "last.ckpt"))
    reasons = []
    for name in candidates:
        try:
            files.verify(name)
            return files.folder / name, check_full(torch_load(files.folder / name), files.folder / name)
        except CheckpointError as err:
            print(f"resume: skipped {name}: {err}")
            reasons.append(f"{name}: {err}")
    raise CheckpointError(f"{folder}: no checkpoint to resume from" + "".join(f"\n  {r}" for r in reasons))


def load_resume(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint to resume from: a run folder (its newest valid checkpoint) or one file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if path.is_dir():
        return find_resumable(path)
    files = RunFiles(path.parent)
    if path.name in files.files:
        files.verify(path.name)
    else:
        print(f"resume: {path} is not listed in a {MANIFEST}; loading it without a hash check")
    return path, check_full(torch_load(path), path)


# What --resume reads from a full checkpoint, and the type each must have.
FULL_PARTS = {
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": list,
    "history": list,
    "freeze_manifest": dict,
    "config": dict,
}


def check_full(checkpoint: Any, path: Path) -> dict[str, Any]:
    """A full checkpoint with every part a resume reads, each of its type; else one line naming the first one not."""
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} is not a full checkpoint (last.ckpt or epoch-*.ckpt): it has no optimizer state")
    for key, kind in FULL_PARTS.items():
        value = checkpoint.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if key not in checkpoint else f"a {type(value).__name__}"
            raise CheckpointError(f"{path}: its {key} is {found}, not a {kind.__name__}; it cannot be resumed")
    if not all(isinstance(row, dict) for row in checkpoint["history"]) or checkpoint["epoch"] < 0:
        raise CheckpointError(f"{path}: its epoch or history is not what a run writes; it cannot be resumed")
    return checkpoint
