"""What a person sees: the freeze summary and progress bars."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import child_env
from torch.utils.data import DataLoader

from linear_probe_small_cnn.data import DEFAULT_DATA, make_datasets
from linear_probe_small_cnn.distributed import World
from linear_probe_small_cnn.optim import make_optimizer
from linear_probe_small_cnn.run import prepare_model
from linear_probe_small_cnn.train import fit, show_progress, train_one_epoch


def test_the_freeze_summary_lists_children_and_the_trainable_share(tmp_path, config, capsys):
    fit(config, tmp_path / "run", epochs=1, device="cpu")
    printed = capsys.readouterr().out
    model, _ = prepare_model(config)
    for name, _ in model.named_children():
        assert f" {name} " in printed, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable {trainable:,} of {total:,} parameters ({trainable / total:.1%})" in printed
    assert "BatchNorm (eval_frozen):" in printed


def test_progress_bars_only_for_a_person_at_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(World(rank=0, size=1))
    assert not show_progress(World(rank=1, size=2)), "only rank 0 draws a bar"
    monkeypatch.setenv("CI", "true")
    assert not show_progress(World(rank=0, size=1))
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_progress(World(rank=0, size=1))


def test_the_bar_shows_loss_accuracy_and_images_per_second(config, capsys):
    model, _ = prepare_model(config)
    train_set, _ = make_datasets(DEFAULT_DATA, config)
    loader = DataLoader(train_set, batch_size=config.train.batch_size)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = make_optimizer(model, config)
    loss, correct, count = train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), None, "epoch 0")
    bar = capsys.readouterr().err
    assert "epoch 0" in bar and "loss=" in bar and "acc=" in bar and "img_s=" in bar
    assert count == len(train_set) and 0 <= correct <= count and loss > 0
    train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), None)
    assert capsys.readouterr().err == "", "no bar without a description"


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`linear_probe_small_cnn layers | head -1`: the pipe closes under the command, which stops quietly."""
    command = [sys.executable, "-m", "linear_probe_small_cnn", "layers"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    proc.stdout.close()  # before the command has printed anything: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
