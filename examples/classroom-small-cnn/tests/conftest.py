"""Shared test helpers: a shrunken config (tiny data, the real code path) and a stand-in for pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from classroom_small_cnn.config import Config, load_config
from classroom_small_cnn.model import build_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false"))


@pytest.fixture
def config() -> Config:
    """The project's own settings, with little data and two epochs."""
    # A 32-pixel side keeps every backbone fast on a CPU (a ViT then sees 2x2 patches).
    return load_config(overrides=["data.synthetic_train_size=64", "data.synthetic_val_size=32", "model.image_size=32",
                                  "train.batch_size=16", "train.epochs=2"])


def pretrained(path: Path, config: Config) -> dict[str, torch.Tensor]:
    """A file of weights from another seed, standing in for a download; returns what it holds."""
    torch.manual_seed(1234)
    state = {k: v.clone() for k, v in build_model(config).state_dict().items()}
    torch.save(state, path)
    return state


def tiny_bn_model() -> nn.Module:
    """Two conv+BatchNorm parts and a head: BatchNorm behaviour, tested on every backbone's render."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
    )

# Each exercise's first failure, by number; filled as the tests run.
EXERCISES: dict[int, list[str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Note how each exercise's tests went; a test of no exercise that reaches an unwritten one waits (skipped).

    The tests marked exerciseN fail until exercise N is written; the others
    (a whole run, the command line) need several exercises and run once they are.
    """
    outcome = yield
    report = outcome.get_result()
    numbers = [int(m.name[8:]) for m in item.iter_markers() if m.name.startswith("exercise")]
    if report.when != "call":
        return
    for number in numbers:
        why = call.excinfo.exconly().splitlines()[0] if report.failed else ""
        EXERCISES.setdefault(number, []).append(why)
    # The stub's error, raised through the test or printed by the command line it ran.
    lines = (report.longreprtext + report.capstderr).splitlines()
    waiting = [line[line.index("exercise ") :] for line in lines if "is not written yet" in line]
    if report.failed and waiting and not numbers:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"waits for {waiting[0]}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The last lines of a run: one per exercise, passing or its first failure."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for number, results in sorted(EXERCISES.items()):
        failures = [why for why in results if why]
        state = f"failing: {failures[0]}" if failures else f"passing ({len(results)} tests)"
        reporter.write_line(f"exercise {number}: {state}")
