"""What a person sees: the freeze summary, progress bars, curves.png and TensorBoard logs."""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from conftest import small_config
from torch.utils.data import DataLoader

from custom_char_model.cli import main
from custom_char_model.config import ConfigError
from custom_char_model.data import DEFAULT_DATA, make_datasets
from custom_char_model.distributed import World
from custom_char_model.plot import PlotError, plot_run, unfreeze_epochs
from custom_char_model.train import fit, make_optimizer, prepare_model, show_progress, train_one_epoch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run folder and its history."""
    config = small_config()
    out = tmp_path_factory.mktemp("run")
    return out, fit(config, out, epochs=2, device="cpu")


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
    loader = DataLoader(train_set, batch_size=config["train"]["batch_size"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = make_optimizer(model, config)
    loss, correct, count = train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), None, "epoch 0")
    bar = capsys.readouterr().err
    assert "epoch 0" in bar and "loss=" in bar and "acc=" in bar and "img_s=" in bar
    assert count == len(train_set) and 0 <= correct <= count and loss > 0
    train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), None)
    assert capsys.readouterr().err == "", "no bar without a description"


def test_plot_writes_curves_png_from_the_run(run, capsys):
    out, history = run
    assert main(["plot", str(out)]) == 0
    assert f"wrote {out / 'curves.png'}" in capsys.readouterr().out
    image = (out / "curves.png").read_bytes()
    assert image.startswith(PNG_MAGIC)
    # Width and height from the PNG header: the 10 x 4 inch figure at 120 dpi.
    assert (int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")) == (1200, 480)
    with open(out / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert unfreeze_epochs(rows) == []


def test_unfreeze_epochs_are_where_more_parameters_train():
    rows = [{"epoch": e, "trainable_params": n} for e, n in enumerate([10, 10, 50, 50, 90])]
    assert unfreeze_epochs(rows) == [2, 4]


def test_plot_errors_say_what_is_missing(tmp_path, monkeypatch, capsys):
    with pytest.raises(PlotError, match="metrics.csv does not exist"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,val_loss,val_acc\n")
    with pytest.raises(PlotError, match="no finished epoch"):
        plot_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["plot", str(tmp_path)]) == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_tensorboard_logs_every_metric_per_epoch(tmp_path, config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config["log"]["tensorboard"] = True
    history = fit(config, tmp_path / "run", epochs=2, device="cpu")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [0, 1]
        assert [e.value for e in logged] == pytest.approx([row[key] for row in history])


def test_tensorboard_without_the_package_fails_before_the_run_folder(tmp_path, config, monkeypatch):
    config["log"]["tensorboard"] = True
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        fit(config, tmp_path / "run", epochs=1, device="cpu")
    assert not (tmp_path / "run").exists()
