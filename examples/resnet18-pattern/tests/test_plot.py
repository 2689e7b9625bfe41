"""`plot DIR`: curves.png from a run's metrics.csv, and errors that say what is missing."""

from __future__ import annotations

import sys

import pytest
from conftest import small_config

from resnet18_pattern.cli import main
from resnet18_pattern.plot import PlotError, plot_run, read_metrics, unfreeze_epochs
from resnet18_pattern.train import fit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run folder and its history."""
    config = small_config()
    out = tmp_path_factory.mktemp("run")
    return out, fit(config, out, epochs=2, device="cpu")


def test_plot_writes_curves_png_from_the_run(run, capsys):
    out, history = run
    assert main(["plot", str(out)]) == 0
    assert f"wrote {out / 'curves.png'}" in capsys.readouterr().out
    image = (out / "curves.png").read_bytes()
    assert image.startswith(PNG_MAGIC)
    # Width and height from the PNG header: the 10 x 4 inch figure at 120 dpi.
    assert (int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")) == (1200, 480)
    assert unfreeze_epochs(read_metrics(out)) == []


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


def test_lr_find_draws_its_curve_and_needs_matplotlib_before_writing(tmp_path, config_file, monkeypatch, capsys):
    out = tmp_path / "lr"
    assert main(["--config", str(config_file), "lr-find", "--out", str(out), "--steps", "20", "--end", "1"]) == 0
    assert (out / "lr_find.png").read_bytes().startswith(PNG_MAGIC)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["--config", str(config_file), "lr-find", "--out", str(tmp_path / "again")]) == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("content", [b"epoch,train_loss\n0,lots\n", b"epoch,train_loss\n0,\xff\xfe\n"])
def test_a_metrics_csv_of_text_or_other_bytes_is_one_line(tmp_path, content):
    (tmp_path / "metrics.csv").write_bytes(content)
    with pytest.raises(PlotError, match="is not a metrics.csv as a run writes it"):
        plot_run(tmp_path)
