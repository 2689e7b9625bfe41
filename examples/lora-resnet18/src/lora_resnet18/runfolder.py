"""A run folder holds one run: claimed with a lock for the whole run, never silently overwritten.

A second `train` on a folder that holds a run is refused (continue it with
--resume, or start over with --overwrite); a second process on a folder in
use is refused at once, naming the holder's PID. The lock is an flock on
RUN/.lock, which the operating system drops when the process dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import IO

from .checkpoint import MANIFEST
from .config import ConfigError

LOCK = ".lock"
# What a run writes; any of them means the folder already holds a run.
RUN_FILES = re.compile(
    r"^(config\.toml|classes\.json|split\.json|freeze_manifest\.json|metrics\.csv|best\.pt|best\.safetensors|best_adapter\.safetensors|last\.ckpt|epoch-\d+\.ckpt"
    r"|" + re.escape(MANIFEST) + ")$"
)
# What lr-find writes: a folder holding them is not a run's.
LR_FIND_FILES = ("lr_find.csv",)
# atomic_path's temp files: .NAME.RANDOM.tmp
TEMP_FILE = re.compile(r"^\..+\.tmp$")


def run_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if RUN_FILES.match(p.name)) if folder.is_dir() else []


def check_free(folder: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse a folder that holds another run, before anything is written."""
    curve = [name for name in LR_FIND_FILES if (folder / name).exists()]
    if curve:
        raise ConfigError(f"{folder} holds lr-find's {curve[0]}; a run folder holds one run: pass another --out")
    found = run_files(folder)
    if found and not resuming and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(
            f"{folder} already holds a run ({shown}): continue it with --resume {folder}, "
            "or pass another --out (--overwrite deletes it and starts over)"
        )


def claim(folder: Path, *, overwrite: bool) -> IO[str]:
    """Lock `folder` for this process; with `overwrite`, remove the old run's files first.

    Also removes the temp files of a save that a killed process left. The
    returned file holds the lock until it is closed or the process ends.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK, "a+")  # held open for the whole run: closing it releases the lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(
            f"{folder} is in use by another run (process {holder}); wait for it or pass another --out"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for path in folder.iterdir():
        if TEMP_FILE.match(path.name) or (overwrite and RUN_FILES.match(path.name)):
            path.unlink()
    return lock
