"""A run folder holds one run: claimed with a lock for the whole run, never silently overwritten.

A second `train` on a folder that holds a run is refused (continue it with
--resume, or start over with --overwrite); a second process on a folder in
use is refused at once, naming the holder's PID. The lock is an flock on
RUN/.lock, which the operating system drops when the process dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .checkpoint import MANIFEST
from .config import ConfigError

LOCK = ".lock"
# What a run writes; any of them means the folder already holds a run.
RUN_FILES = re.compile(
    r"^(config\.toml|classes\.json|data\.json|split\.json|freeze_manifest\.json|metrics\.csv|best\.pt|best\.safetensors|last\.ckpt|epoch-\d+\.ckpt"
    r"|" + re.escape(MANIFEST) + ")$"
)
# What lr-find writes: a folder holding them is not a run's.
LR_FIND_FILES = ("lr_find.csv",)
# atomic_path's temp files: .NAME.RANDOM.tmp
TEMP_FILE = re.compile(r"^\..+\.tmp$")


def run_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if RUN_FILES.match(p.name)) if folder.is_dir() else []


def check_destination(path: Path, flag: str, *, folder: bool) -> None:
    """An --out that can be written, checked before anything is: a folder (made if need be) or a file in one."""
    if path.exists() and folder != path.is_dir():
        kinds = ("file", "folder") if folder else ("folder", "file")
        raise ConfigError(f"{flag} {path} is a {kinds[0]}; name a {kinds[1]}")
    parent = path if folder else path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, so nothing can be written under it")
    if not folder and existing != parent:
        raise ConfigError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable")


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


@dataclass
class Claim:
    """A claimed run folder: the held lock, and what the folder held once it was claimed."""

    lock: IO[str]
    folder: Path
    made: bool  # the claim made the folder
    before: set[str] = field(default_factory=set)  # its entries, the claim's own .lock left out

    def close(self, keep: bool = True) -> None:
        """Release the lock; `keep=False` (a run that saved nothing) removes what the run added since the claim.

        Only the run's own files, its .lock and the folder it made go: a
        failed first epoch leaves the folder as the run found it, and a plain retry works.
        """
        self.lock.close()
        if keep:
            return
        for path in self.folder.iterdir():
            ours = path.name == LOCK or TEMP_FILE.match(path.name) or RUN_FILES.match(path.name)
            if not ours or path.name in self.before:
                continue
            path.unlink(missing_ok=True)
        if self.made:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def claim(folder: Path, *, resuming: bool, overwrite: bool) -> Claim:
    """Lock `folder` for this process, check under the lock that it is free, then clear it.

    The folder is checked again once the lock is held: another process may
    have started a run in it since start_run looked. With `overwrite` the old
    run's files go; the temp files of a save that a killed process left go
    too. Nothing is opened through a symbolic link. A refusal leaves the
    folder as it found it. The lock is held until the claim is closed or the
    process ends.
    """
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {folder}: cannot make the run folder ({err.strerror})") from None
    lock_path = folder / LOCK
    fresh = not lock_path.is_symlink() and not lock_path.exists()
    try:
        # O_NOFOLLOW: a .lock that is a link (to a file outside the run) is refused, never written.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        undo_claim(folder, made, fresh=False)
        why = "is a symbolic link" if lock_path.is_symlink() else f"cannot be opened ({err.strerror})"
        raise ConfigError(f"{lock_path} {why}; a run folder's files are never written through a link") from None
    lock = os.fdopen(fd, "r+")  # held open for the whole run: closing it releases the lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(
            f"{folder} is in use by another run (process {holder}); wait for it or pass another --out"
        ) from None
    try:
        check_free(folder, resuming=resuming, overwrite=overwrite)
        if not overwrite:  # --overwrite removes the links themselves, never what they point to
            check_links(folder)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except (ConfigError, OSError) as err:
        lock.close()
        undo_claim(folder, made, fresh)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{folder}: cannot write the run's lock ({err.strerror}); nothing was written") from None
    clear(folder, overwrite=overwrite)
    return Claim(lock, folder, made, {p.name for p in folder.iterdir()} - ({LOCK} if fresh else set()))


def check_links(folder: Path) -> None:
    """A run's own file or store that is a symbolic link is refused: the run would write or delete through it."""
    names = [p.name for p in folder.iterdir() if p.is_symlink() and (RUN_FILES.match(p.name))]
    if names:
        raise ConfigError(
            f"{folder / names[0]} is a symbolic link; a run folder's files are never written through a link: remove it"
        )


def undo_claim(folder: Path, made: bool, fresh: bool) -> None:
    """Leave the folder as a refused claim found it: its .lock, and the folder itself, only if this claim made them."""
    if fresh:
        (folder / LOCK).unlink(missing_ok=True)
    if made:
        with contextlib.suppress(OSError):
            folder.rmdir()


def clear(folder: Path, *, overwrite: bool) -> None:
    """The temp files of a killed save; with `overwrite`, the old run's files."""
    for path in folder.iterdir():
        if TEMP_FILE.match(path.name) or (overwrite and RUN_FILES.match(path.name)):
            path.unlink()
