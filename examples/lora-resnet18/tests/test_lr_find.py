"""lr-find: a range test over the real param groups that leaves the model, the RNGs and later runs as they were."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import to_toml
from test_stages import stage_plan

from lora_resnet18 import lr_find as lr_find_module
from lora_resnet18.checkpoint import read_state_dict
from lora_resnet18.cli import main
from lora_resnet18.config import load_config
from lora_resnet18.data import DEFAULT_DATA, make_datasets
from lora_resnet18.lr_find import lr_find, suggest
from lora_resnet18.run import prepare_model
from lora_resnet18.train import fit

try:
    import numpy as np
except ImportError:  # torch runs without numpy; then there is no numpy RNG to keep
    np = None

SWEEP = (1e-5, 1.0, 20)


def test_the_model_its_freeze_state_and_every_rng_are_left_as_they_were(config):
    model, state = prepare_model(config)
    train_set, _ = make_datasets(DEFAULT_DATA, config)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen, modes = set(state.frozen), dict(state.bn_modes)
    random.seed(7)
    torch.manual_seed(7)
    python, torch_state = random.getstate(), torch.get_rng_state()
    numpy = np.random.get_state() if np is not None else None

    test = lr_find(model, state, config, train_set, torch.device("cpu"), 0, SWEEP)

    assert len(test.rows) >= 2 and test.rows[0]["lr"] == SWEEP[0]
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items()), "lr-find trained the model"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert (state.frozen, state.bn_modes) == (frozen, modes)
    assert random.getstate() == python and torch.equal(torch.get_rng_state(), torch_state)
    if np is not None:
        after_numpy = np.random.get_state()
        assert after_numpy[0] == numpy[0] and (after_numpy[1] == numpy[1]).all() and after_numpy[2:] == numpy[2:]


def test_every_group_runs_at_the_swept_lr_times_its_own_lr_mult(config, monkeypatch):
    stage_plan(config)
    model, state = prepare_model(config)
    train_set, _ = make_datasets(DEFAULT_DATA, config)
    built = []

    def keep(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = lr_find_module.make_optimizer
    monkeypatch.setattr(lr_find_module, "make_optimizer", keep)
    test = lr_find(model, state, config, train_set, torch.device("cpu"), 1, SWEEP)
    last = test.rows[-1]["lr"]
    mults = [group["lr_mult"] for group in built[0].param_groups]
    assert len(set(mults)) > 1, "the stage's groups should have their own lr_mult"
    assert [group["lr"] for group in built[0].param_groups] == pytest.approx([last * mult for mult in mults])


def test_stage_k_tests_the_groups_a_run_has_once_its_first_k_stages_started(config):
    stage_plan(config)
    model, state = prepare_model(config)
    train_set, _ = make_datasets(DEFAULT_DATA, config)
    at_start = lr_find(model, state, config, train_set, torch.device("cpu"), 0, SWEEP)
    after_one = lr_find(model, state, config, train_set, torch.device("cpu"), 1, SWEEP)

    first_stage = min(config.unfreeze.stages, key=lambda stage: stage["epoch"])
    new = [group for group in after_one.groups if group["name"].startswith("stage1")]
    assert new and all(group["lr_mult"] == pytest.approx(first_stage["lr_mult"]) for group in new)
    assert after_one.groups[: len(at_start.groups)] == at_start.groups
    assert state.stages_done == 0, "the stage was applied to the caller's freeze state"


def test_a_train_after_lr_find_is_bit_identical_to_one_without_it(tmp_path, config, config_file):
    cli = ["--config", str(config_file)]
    assert main([*cli, "train", "--out", str(tmp_path / "alone"), "--epochs", "1"]) == 0
    assert main([*cli, "lr-find", "--out", str(tmp_path / "lr"), "--steps", "20", "--end", "1"]) == 0
    assert main([*cli, "train", "--out", str(tmp_path / "after"), "--epochs", "1"]) == 0
    name = "best.safetensors"
    alone, after = read_state_dict(tmp_path / "alone" / name), read_state_dict(tmp_path / "after" / name)
    assert alone.keys() == after.keys()
    assert all(torch.equal(alone[key], after[key]) for key in alone)
    assert metrics(tmp_path / "alone") == metrics(tmp_path / "after")


def metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the columns that time the run."""
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in csv.DictReader(f)]


def test_cli_writes_the_curve_and_a_suggestion_that_pastes_into_set(tmp_path, config_file, capsys):
    out = tmp_path / "lr"
    assert main(["--config", str(config_file), "lr-find", "--out", str(out), "--steps", "30", "--end", "10"]) == 0
    with open(out / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed_loss"]
    lrs = [float(row["lr"]) for row in rows]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-7)
    printed = capsys.readouterr().out
    if "suggested" in printed:
        option = next(word for word in printed.split() if word.startswith("train.lr="))
        assert lrs[0] <= load_config(config_file, [option]).train.lr <= lrs[-1]
    else:
        assert "no suggestion:" in printed


def test_the_suggestion_is_the_steepest_fall_of_a_known_curve():
    # A loss that falls from 2 to 0 as a logistic in log10(lr), steepest at 1e-3, then blows up.
    lrs = [10 ** (-6 + 5 * i / 99) for i in range(100)]
    losses = [2 / (1 + math.exp(4 * (math.log10(lr) + 3))) + (lr > 1e-2) * 50 * lr for lr in lrs]
    rows = [{"lr": lr, "loss": loss, "smoothed_loss": loss} for lr, loss in zip(lrs, losses, strict=True)]
    suggestion, _ = suggest(rows)
    assert suggestion is not None and abs(math.log10(suggestion) + 3) < 0.1

    flat = [{**row, "smoothed_loss": 2.0} for row in rows]
    assert suggest(flat)[0] is None, "a loss that never fell has no slope to read"


def test_bad_flags_and_a_run_folder_are_refused_before_anything_is_written(tmp_path, config, config_file, capsys):
    cli = ["--config", str(config_file), "lr-find"]
    assert main([*cli, "--out", str(tmp_path / "a"), "--start", "1", "--end", "0.1"]) == 2
    assert main([*cli, "--out", str(tmp_path / "a"), "--stage", "9"]) == 2
    assert "--stage 9: the config has" in capsys.readouterr().err
    config.unfreeze.stages = [{"epoch": config.train.epochs, "select": "*"}]
    (tmp_path / "late.toml").write_text(to_toml(config))
    assert main(["--config", str(tmp_path / "late.toml"), "lr-find", "--out", str(tmp_path / "a"), "--stage", "1"]) == 2
    assert "after the run's last" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    (tmp_path / "a-file").write_text("")
    assert main([*cli, "--out", str(tmp_path / "a-file" / "lr")]) == 2
    assert "a-file is a file" in capsys.readouterr().err

    run = tmp_path / "run"
    fit(config, run, epochs=1, device="cpu")
    before = sorted(path.name for path in run.iterdir())
    for out in (run, run / "lr"):
        assert main([*cli, "--out", str(out)]) == 2
        assert "holds a training run" in capsys.readouterr().err
    assert sorted(path.name for path in run.iterdir()) == before

    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "lr_find.csv").write_text("an earlier curve\n")
    assert main([*cli, "--out", str(tmp_path / "lr"), "--steps", "20"]) == 2
    assert (tmp_path / "lr" / "lr_find.csv").read_text() == "an earlier curve\n"
    assert main([*cli, "--out", str(tmp_path / "lr"), "--steps", "20", "--overwrite"]) == 0
    assert (tmp_path / "lr" / "lr_find.csv").read_text().startswith("step,lr,loss,smoothed_loss")

    # Nor does a run go where a curve is: the folder would hold two things.
    assert main(["--config", str(config_file), "train", "--out", str(tmp_path / "lr"), "--epochs", "1"]) == 2
    assert "holds lr-find's lr_find.csv" in capsys.readouterr().err
