"""The command line and the run folder: what a run writes, and what it refuses before writing anything."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest
import torch

from classroom_small_cnn import train
from classroom_small_cnn.checkpoint import torch_bytes
from classroom_small_cnn.config import UserError, config_from_dict, load_config
from classroom_small_cnn.train import fit, main

TINY = ["--set", "data.synthetic_train_size=64", "--set", "data.synthetic_val_size=32", "--set", "model.image_size=32"]


def test_train_writes_the_run_folder_and_learns(tmp_path: Path):
    out = tmp_path / "run"
    assert main([*TINY, "--set", "train.batch_size=16", "train", "--epochs", "3", "--out", str(out)]) == 0
    expected = {"best.pt", "last.ckpt", "metrics.csv", "config.toml", "freeze_manifest.json"}
    assert {p.name for p in out.iterdir()} == expected
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["val_acc"]) > 1 / load_config().model.num_classes  # better than chance


def test_a_run_folder_is_not_overwritten_without_overwrite(tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "train", "--epochs", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*TINY, "train", "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*TINY, "train", "--epochs", "1", "--out", str(out), "--overwrite"]) == 0


def test_overwrite_with_a_bad_setting_keeps_the_old_run(tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "train", "--epochs", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = ["--set", 'freeze.frozen=["no_such_module"]']
    assert main([*TINY, *bad, "train", "--epochs", "1", "--out", str(out), "--overwrite"]) == 2
    assert "no_such_module" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old run must survive a refused new one"


def test_overwrite_removes_a_link_and_never_what_it_points_to(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").symlink_to(victim)
    assert main([*TINY, "train", "--epochs", "1", "--out", str(tmp_path / "run"), "--overwrite"]) == 0
    assert victim.read_text() == "keep"


def test_a_bad_setting_is_one_line_naming_the_key_and_the_closest(capsys):
    assert main(["--set", "train.lrr=0.1", "layers"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown key in [train] 'lrr'; did you mean lr?\n"
    with pytest.raises(UserError, match="train.seed = -1: allowed 0..4294967295"):
        load_config(overrides=["train.seed=-1"])
    with pytest.raises(UserError, match=r"\[model\] must be a table"):
        config_from_dict({"model": 5})


def test_a_nan_loss_stops_the_run_before_anything_is_saved(config, tmp_path: Path):
    config.train.lr = float("inf")
    with pytest.raises(UserError, match="the loss is nan"):
        fit(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_layers_prints_every_parameter_and_what_trains(capsys):
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "top-level children (for index selectors): 0=" in out and "parameters train" in out
    stage = ["--set", 'freeze.frozen=["idx:0..-1"]', "--set", "freeze.stages=[{epoch = 1, select = [0]}]"]
    assert main([*stage, "layers", "--epoch", "0"]) == 0
    before = capsys.readouterr().out
    assert main([*stage, "layers", "--epoch", "1"]) == 0  # the state epoch 1 trains in: its stage has released
    after = capsys.readouterr().out
    frozen = [line.split()[0] for line in before.splitlines() if line.endswith("frozen")]
    assert frozen and [line.split()[0] for line in after.splitlines() if line.endswith("frozen")] != frozen


def dropout_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    model.train()
    for _ in range(n):  # the batches, their scale and the dropout masks come from torch's and Python's RNGs
        loss = model(torch.randn(16, 4) * random.uniform(0.5, 2.0)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.exercise5
def test_restore_puts_back_the_optimizer_and_every_rng_so_training_continues_exactly():
    model, optimizer = dropout_model(0)
    random.seed(0)
    steps(model, optimizer, 3)
    state = {"epoch": 0, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": train.rng_state(),
             "history": [{"epoch": 0, "val_acc": 0.5}], "best": 0.5}
    saved = torch.load(io.BytesIO(torch_bytes(state)), weights_only=True)  # as last.ckpt holds it
    steps(model, optimizer, 3)
    resumed, resumed_optimizer = dropout_model(1)  # a new process: other weights, other RNG states
    random.seed(1)
    assert train.restore(saved, resumed, resumed_optimizer) == ([{"epoch": 0, "val_acc": 0.5}], 0.5)
    steps(resumed, resumed_optimizer, 3)
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
    assert gap == 0, f"the resumed run is {gap:.3g} away from the unbroken one: put back the optimizer and every RNG"
