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
import sys
from collections.abc import Callable
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
    """The trackers of one run folder, and the last epoch each one holds.

    A tracker that fails (its server unreachable, its disk full) is dropped
    for the rest of this invocation with one warning: training goes on, and
    RUN/trackers.json keeps the last epoch it holds, so the epochs it missed
    reach it at the next resume.
    """

    def __init__(self, out: Path, saved: dict[str, Any]) -> None:
        self.out, self.record = out, dict(saved)
        self.items: list[Tracker] = []
        self.logged: dict[str, int] = {}

    def guarded(self, what: str, action: Callable[[Tracker], None]) -> None:
        """`action` on each tracker; one that raises is reported and dropped, never the run."""
        for tracker in list(self.items):
            try:
                action(tracker)
            except Exception as err:  # noqa: BLE001 - whatever a tracker's library raises
                self.items.remove(tracker)
                print(
                    f"warning: {tracker.name} failed to {what} ({type(err).__name__}: {err}); "
                    "it is off for this run, and a resume catches it up",
                    file=sys.stderr,
                )

    def sync(self, history: list[dict[str, float]]) -> None:
        """Every saved epoch a tracker does not hold yet, then the record of what each one holds."""

        def log(tracker: Tracker) -> None:
            for row in history:
                if row["epoch"] > self.logged[tracker.name]:
                    tracker.row(row)
                    self.logged[tracker.name] = int(row["epoch"])
                    self.record[tracker.name]["logged"] = self.logged[tracker.name]

        self.guarded("log an epoch", log)
        atomic_write(self.out / TRACKERS, lambda f: f.write(json.dumps(self.record, indent=2).encode()))

    def file(self, path: Path) -> None:
        self.guarded(f"store {path.name}", lambda tracker: tracker.file(path))

    def close(self, files: list[Path], failed: bool) -> None:
        """`files` (the best weights) once, at the end: a copy per improvement would double a run's disk."""
        for path in files:
            self.file(path)
        self.guarded("finish", lambda tracker: tracker.close(failed))


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
    trackers = Trackers(out, json.loads(path.read_text()) if path.exists() else {})
    first = int(history[-1]["epoch"]) + 1 if history else 0
    for name in names:
        where = destination(name, out, config)
        before = continued(name, trackers.record.get(name), first, where)
        run_id = before["run_id"] if before is not None else None
        logged = before["logged"] if before is not None else -1
        try:
            tracker = make(name, out, config, run_id, logged + 1)
            if run_id is None:
                tracker.params(params)
        except Exception as err:  # noqa: BLE001 - a tracker never stops a run
            print(f"warning: {name} did not start ({type(err).__name__}: {err}); training goes on without it")
            continue
        if tracker.run_id:
            print(f"{name}: {'continues' if run_id else 'new'} run {tracker.run_id}")
        trackers.items.append(tracker)
        trackers.logged[name] = logged
        trackers.record[name] = {"run_id": tracker.run_id, "logged": logged, "where": where}
    trackers.file(out / "freeze_manifest.json")
    trackers.sync(history)
    return trackers


def continued(name: str, before: dict[str, Any] | None, first: int, where: str) -> dict[str, Any] | None:
    """The saved record of a tracker run this run can go on with, or None for a new run.

    A tracker run elsewhere now (another store, project or mode), or one that
    holds epochs from `first` on (a resume from an older checkpoint than its
    last), cannot hold this history once: a new run gets all of it.
    """
    if before is not None and before.get("where", where) != where:
        print(f"{name}: now {where}, not {before['where']}; a new run gets the whole history")
        return None
    if before is None or before["logged"] < first:
        return before
    if name == "tensorboard":  # purge_step drops its events from `first` on
        return {"run_id": "", "logged": first - 1}
    print(f"{name}: run {before['run_id']} holds epochs past {first - 1}; this resume logs to a new run")
    return None


def destination(name: str, out: Path, config: Config) -> str:
    """Where a tracker's run lives: a change of it on resume means a new run."""
    return str(out / name)


def make(name: str, out: Path, config: Config, run_id: str | None, first: int) -> Tracker:
    if name == "tensorboard":
        return TensorBoard(out, first)
    raise ValueError(name)


def flat_params(config: Config, counts: dict[str, int]) -> dict[str, Any]:
    """The resolved config as section.key params, and the freeze counts beside it."""
    values = {f"{section}.{key}": value for section, keys in config.to_dict().items() for key, value in keys.items()}
    return {**values, **{f"freeze.{key}": value for key, value in counts.items()}}
