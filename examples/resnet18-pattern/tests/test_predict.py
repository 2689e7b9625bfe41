"""Class names travel with the weights, predict agrees with evaluate, and other classes are refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import image_folder, small_config, to_toml

from resnet18_pattern.checkpoint import read_classes
from resnet18_pattern.cli import main
from resnet18_pattern.commands import trained_model
from resnet18_pattern.config import ConfigError, load_config
from resnet18_pattern.data import example_inputs
from resnet18_pattern.export import export
from resnet18_pattern.train import fit

NUM_CLASSES = small_config().model.num_classes
# Folder names in ImageFolder's (sorted) order: what the labels are named by.
NAMES = [f"flower_{chr(ord('a') + c)}" for c in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on an image folder of named classes, its data and a config file for the CLI."""
    root = tmp_path_factory.mktemp("data")
    images = image_folder(root / "images", names=NAMES)
    config = small_config()
    config_file = root / "small.toml"
    config_file.write_text(to_toml(config))
    out = root / "run"
    fit(config, out, data=str(images), epochs=2, stop_after=1, device="cpu")
    return images, out, ["--config", str(config_file)]


def test_class_names_travel_with_every_file_of_the_run(trained):
    _, out, _ = trained
    assert json.loads((out / "classes.json").read_text()) == NAMES
    assert read_classes(out / "best.safetensors") == NAMES
    assert read_classes(out / "last.ckpt") == NAMES
    assert torch.load(out / "last.ckpt", weights_only=True)["classes"] == NAMES


def test_predict_agrees_with_evaluate(trained, tmp_path, capsys):
    images, out, config = trained
    weights = str(out / "best.safetensors")
    assert main([*config, "evaluate", "--weights", weights, "--data", str(images), "--device", "cpu", "--json"]) == 0
    val_acc = json.loads(capsys.readouterr().out)["val_acc"]
    table = tmp_path / "predictions.csv"
    args = [*config, "predict", "--weights", weights, str(images / "val"), "--top-k", "2", "--out", str(table)]
    assert main([*args, "--device", "cpu"]) == 0
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "rank", "label", "probability"]
    firsts = [row for row in rows if row["rank"] == "1"]
    assert len(firsts) == len(list((images / "val").rglob("*.png"))) and len(rows) == 2 * len(firsts)
    accuracy = sum(Path(row["path"]).parent.name == row["label"] for row in firsts) / len(firsts)
    assert accuracy == pytest.approx(val_acc)
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        assert first["path"] == second["path"] and float(first["probability"]) >= float(second["probability"])
        assert first["label"] in NAMES and first["label"] != second["label"]
    # Without --out, the same rows as a table, its columns in the CSV's order.
    capsys.readouterr()
    assert main([*args[:-2], "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["path", "rank", "label", "probability"]
    for line, row in zip(lines[1:], rows, strict=True):
        *cells, probability = line.split()
        assert cells == [row["path"], row["rank"], row["label"]]
        assert float(probability) == pytest.approx(float(row["probability"]), abs=1e-4)


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript"])
def test_predict_on_an_export_gives_what_the_weights_give(trained, tmp_path, fmt):
    images, out, config = trained
    exported = tmp_path / f"model.{fmt}"
    weights = str(out / "best.safetensors")
    assert main([*config, "export", "--weights", weights, "--format", fmt, "--out", str(exported)]) == 0
    tables = {}
    for name, source in (("weights", weights), ("export", str(exported))):
        tables[name] = tmp_path / f"{name}.csv"
        args = [*config, "predict", "--weights", source, str(images / "val"), "--top-k", "2"]
        assert main([*args, "--out", str(tables[name]), "--device", "cpu"]) == 0
    rows = {name: list(csv.DictReader(open(path))) for name, path in tables.items()}
    assert [(r["path"], r["label"]) for r in rows["export"]] == [(r["path"], r["label"]) for r in rows["weights"]]
    for ours, theirs in zip(rows["export"], rows["weights"], strict=True):
        assert float(ours["probability"]) == pytest.approx(float(theirs["probability"]), abs=1e-4)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """A run trained at an image size that is not the packaged config's, and its data."""
    root = tmp_path_factory.mktemp("resized")
    images = image_folder(root / "images", names=NAMES)
    config = small_config()
    config.train.image_size = load_config().train.image_size + 16
    fit(config, root / "run", data=str(images), epochs=1, device="cpu")
    return images, root / "run"


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript"])
def test_an_export_outside_its_run_predicts_with_its_own_input_size_and_no_config(resized, tmp_path, fmt, capsys):
    images, out = resized
    weights, exported = str(out / "best.safetensors"), tmp_path / f"model.{fmt}"  # no config.toml beside it
    assert main(["export", "--weights", weights, "--format", fmt, "--out", str(exported)]) == 0
    tables = {"weights": tmp_path / "weights.csv", "export": tmp_path / "export.csv"}
    for name, source in (("weights", weights), ("export", str(exported))):
        args = ["predict", "--weights", source, str(images / "val"), "--top-k", "2", "--out", str(tables[name])]
        assert main([*args, "--device", "cpu"]) == 0
    rows = {name: list(csv.DictReader(open(path))) for name, path in tables.items()}
    assert [(r["path"], r["label"]) for r in rows["export"]] == [(r["path"], r["label"]) for r in rows["weights"]]
    for ours, theirs in zip(rows["export"], rows["weights"], strict=True):
        assert float(ours["probability"]) == pytest.approx(float(theirs["probability"]), abs=1e-4)
    # A config that says otherwise is refused, naming both values; the export's own record decides.
    capsys.readouterr()
    packaged = load_config().train.image_size
    args = ["--set", f"train.image_size={packaged}", "predict", "--weights", str(exported), str(images / "val")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"train.image_size = {packaged + 16}" in err and f"gives {packaged}" in err and err.count("\n") == 1, err


def test_an_export_without_a_preprocessing_record_runs_with_the_config_as_before(resized, tmp_path):
    images, out = resized
    config = load_config(out / "config.toml")
    exported = tmp_path / "old.pt2"
    model = trained_model(str(out / "best.safetensors"), config)
    export(model, "pt2", exported, example_inputs(config, 2), classes=NAMES)  # no preprocessing: an older export
    assert main(["--config", str(out / "config.toml"), "predict", "--weights", str(exported), str(images)]) == 0


def test_predict_and_export_take_a_run_folder_and_options_after_the_command(trained, tmp_path, capsys):
    images, out, config = trained
    assert main(["predict", "--run", str(out), str(images / "val"), "--device", "cpu", *config]) == 0
    assert "flower_" in capsys.readouterr().out
    exported = tmp_path / "model.pt2"
    assert main(["export", "--run", str(out), "--format", "pt2", "--out", str(exported), "--set", "train.seed=1"]) == 0
    assert exported.is_file()
    # --set before the command and after it both count: here the first one is refused.
    args = ["--set", "train.image_size=48", "evaluate", "--run", str(out), "--set", "train.batch_size=4"]
    assert main(args) == 2
    assert "this config has 48" in capsys.readouterr().err


def test_an_unreadable_image_is_named_and_skipped_and_the_exit_status_says_so(trained, tmp_path, capsys):
    images, out, config = trained
    folder = tmp_path / "new"
    folder.mkdir()
    good = next((images / "val").rglob("*.png"))
    (folder / "good.png").write_bytes(good.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    assert main([*config, "predict", "--weights", str(out / "best.safetensors"), str(folder), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "good.png" in captured.out and "broken.png" not in captured.out
    assert f"{folder / 'broken.png'}: cannot read the image" in captured.err


def test_evaluate_on_other_classes_is_one_line_naming_both(trained, tmp_path, capsys):
    _, out, config = trained
    other = image_folder(tmp_path / "other", names=[f"tree_{c}" for c in range(NUM_CLASSES)])
    assert main([*config, "evaluate", "--weights", str(out / "best.safetensors"), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flower_a" in err and "tree_0" in err


def test_weights_run_with_the_input_size_they_were_trained_at(trained, tmp_path, capsys):
    images, out, _ = trained
    other = small_config()
    other.train.image_size = 48
    config_file = tmp_path / "other.toml"
    config_file.write_text(to_toml(other))
    weights = str(out / "best.safetensors")
    assert main(["--config", str(config_file), "evaluate", "--weights", weights, "--data", str(images)]) == 2
    assert "was trained with train.image_size = 32, this config has 48" in capsys.readouterr().err


def test_predict_into_a_missing_folder_is_refused_before_any_work(trained, tmp_path, capsys):
    images, out, config = trained
    table = tmp_path / "no" / "such" / "predictions.csv"
    args = [*config, "predict", "--weights", str(out / "best.safetensors"), str(images / "val"), "--out", str(table)]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_resume_on_other_classes_is_refused(trained, tmp_path):
    _, out, _ = trained
    other = image_folder(tmp_path / "other", names=[f"tree_{c}" for c in range(NUM_CLASSES)])
    with pytest.raises(ConfigError, match="was trained on the classes"):
        fit(None, None, data=str(other), resume=out, device="cpu")
