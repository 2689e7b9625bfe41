"""Experiment trackers: TensorBoard, fed from one place.

A tracker is told an epoch only once that epoch's files are saved, and
RUN/trackers.json records which tracker run the folder feeds and the last
epoch it holds. So a resume continues the same tracker run, and each epoch
reaches each tracker exactly once: epochs saved but not yet logged (a crash
between the two) are caught up at the resume. Only rank 0 builds trackers.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write
from .config import Config, ConfigError

TRACKERS = "trackers.json"
# What each tracker imports, and the extra that installs it.
PACKAGES = {
    "tensorboard": ["torch.utils.tensorboard"],
}


def chosen(config: Config) -> list[str]:
    return [name for name in PACKAGES if getattr(config.log, name)]


def check_packages(config: Config) -> None:
    """Each tracker turned on can be imported: checked before the run folder exists."""
    for name in chosen(config):
        for module in PACKAGES[name]:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"log.{name} = true, but {module} is not installed: pip install -e '.[{name}]'"
                ) from None


class Tracker:
    """What a tracker is told; a tracker that keeps no such record leaves a method as it is."""

    name = ""
    run_id = ""

    def params(self, values: dict[str, Any]) -> None:
        pass

    def row(self, row: dict[str, float]) -> None:
        pass

    def file(self, path: Path) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, out: Path, first: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events from `first` on are dropped: what a killed run wrote past its record, logged again now.
        self.writer = SummaryWriter(out / "tensorboard", purge_step=first)

    def row(self, row: dict[str, float]) -> None:
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class Trackers:
    """The trackers of one run folder, and the last epoch each one holds."""

    def __init__(self, out: Path, items: list[Tracker], logged: dict[str, int]) -> None:
        self.out, self.items, self.logged = out, items, logged

    def sync(self, history: list[dict[str, float]]) -> None:
        """Every saved epoch a tracker does not hold yet, then the record of what each one holds."""
        for tracker in self.items:
            for row in history:
                if row["epoch"] > self.logged[tracker.name]:
                    tracker.row(row)
                    self.logged[tracker.name] = int(row["epoch"])
        record = {t.name: {"run_id": t.run_id, "logged": self.logged[t.name]} for t in self.items}
        atomic_write(self.out / TRACKERS, lambda f: f.write(json.dumps(record, indent=2).encode()))

    def file(self, path: Path) -> None:
        for tracker in self.items:
            tracker.file(path)

    def close(self, files: list[Path], failed: bool) -> None:
        """`files` (the best weights) once, at the end: a copy per improvement would double a run's disk."""
        for tracker in self.items:
            for path in files:
                tracker.file(path)
            tracker.close(failed)


def open_trackers(
    out: Path, config: Config, history: list[dict[str, float]], params: dict[str, Any]
) -> Trackers | None:
    """The trackers turned on (None if none), continuing the runs RUN/trackers.json names.

    `history` is what the run holds so far (a resume's saved epochs): each
    tracker gets the epochs it lacks, then the freeze manifest.
    """
    names = chosen(config)
    if not names:
        return None
    path = out / TRACKERS
    saved = json.loads(path.read_text()) if path.exists() else {}
    first = int(history[-1]["epoch"]) + 1 if history else 0
    items, logged = [], {}
    for name in names:
        before = continued(name, saved.get(name), first)
        run_id = before["run_id"] if before is not None else None
        logged[name] = before["logged"] if before is not None else -1
        tracker = make(name, out, config, run_id, logged[name] + 1)
        if run_id is None:
            tracker.params(params)
        if tracker.run_id:
            print(f"{name}: {'continues' if run_id else 'new'} run {tracker.run_id}")
        items.append(tracker)
    trackers = Trackers(out, items, logged)
    trackers.file(out / "freeze_manifest.json")
    trackers.sync(history)
    return trackers


def continued(name: str, before: dict[str, Any] | None, first: int) -> dict[str, Any] | None:
    """The saved record of a tracker run this run can go on with, or None for a new run.

    A tracker run that holds epochs from `first` on (a resume from an older
    checkpoint than its last) would log those epochs twice.
    """
    if before is None or before["logged"] < first:
        return before
    if name == "tensorboard":  # purge_step drops its events from `first` on
        return {"run_id": "", "logged": first - 1}
    print(f"{name}: run {before['run_id']} holds epochs past {first - 1}; this resume logs to a new run")
    return None


def make(name: str, out: Path, config: Config, run_id: str | None, first: int) -> Tracker:
    if name == "tensorboard":
        return TensorBoard(out, first)
    raise ValueError(name)


def flat_params(config: Config, counts: dict[str, int]) -> dict[str, Any]:
    """The resolved config as section.key params, and the freeze counts beside it."""
    values = {f"{section}.{key}": value for section, keys in config.to_dict().items() for key, value in keys.items()}
    return {**values, **{f"freeze.{key}": value for key, value in counts.items()}}
