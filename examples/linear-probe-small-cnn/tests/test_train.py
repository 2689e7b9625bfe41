"""A run on synthetic data writes its folder, learns, and leaves frozen tensors alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from conftest import pretrained_like

from linear_probe_small_cnn.checkpoint import read_state_dict
from linear_probe_small_cnn.cli import main
from linear_probe_small_cnn.evaluation import finite_or_null, report
from linear_probe_small_cnn.model import HEAD, build_model
from linear_probe_small_cnn.saving import METRIC_COLUMNS
from linear_probe_small_cnn.train import fit


def save_init(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Weights from a differently seeded model, saved as a pretrained file would be."""
    torch.manual_seed(1234)
    state = {k: v.clone() for k, v in build_model(config).state_dict().items()}
    # DDP's "module." prefix and a nested "state_dict": both must load.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def test_train_writes_every_run_file(tmp_path, config, config_file):
    out = tmp_path / "run"
    assert main(["--config", str(config_file), "train", "--out", str(out), "--epochs", "2"]) == 0

    manifest = json.loads((out / "freeze_manifest.json").read_text())
    assert {"frozen", "trainable", "bn_fixed"} <= manifest.keys()
    params = [name for name, _ in build_model(config).named_parameters()]
    assert sorted(manifest["frozen"] + manifest["trainable"]) == sorted(params)

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert (out / "best.pt").is_file()
    assert (out / "last.ckpt").is_file()


def test_synthetic_data_is_learnable_in_two_epochs(tmp_path, config):
    pretrained_like(tmp_path / "init.pt", config)
    history = fit(config, tmp_path / "run", epochs=2, init=tmp_path / "init.pt", device="cpu")
    chance = 1 / config.model.num_classes
    assert history[-1]["val_acc"] > 2 * chance, history


def test_frozen_tensors_stay_bit_identical_to_init(tmp_path, config):
    init = save_init(tmp_path / "init.pt", config)
    out = tmp_path / "run"
    fit(config, out, epochs=2, init=tmp_path / "init.pt", device="cpu")
    manifest = json.loads((out / "freeze_manifest.json").read_text())
    trained = read_state_dict(out / "best.pt")
    for name in manifest["frozen"]:
        assert torch.equal(trained[name], init[name]), f"frozen {name} moved"
    for module in manifest["bn_fixed"]:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{module}.{buffer}"
            assert torch.equal(trained[key], init[key]), f"fixed BN statistic {key} moved"
    head = [k for k in manifest["trainable"] if k.startswith(HEAD + ".")]
    assert head and all(not torch.equal(trained[k], init[k]) for k in head), "the head did not train"


def test_layers_lists_children_modules_and_parameters(capsys, config_file):
    assert main(["--config", str(config_file), "layers", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [c["index"] for c in table["children"]] == list(range(len(table["children"])))
    assert any(m["name"] == HEAD for m in table["modules"])
    states = {p["state"] for p in table["parameters"]}
    assert states <= {"frozen", "trainable"}
    assert states == {"frozen", "trainable"}


def test_evaluate_reports_accuracy_of_saved_weights(tmp_path, config, config_file, capsys):
    out = tmp_path / "run"
    fit(config, out, epochs=1, device="cpu")
    weights = out / "best.pt"
    capsys.readouterr()
    report_dir = tmp_path / "report"
    args = ["--config", str(config_file), "evaluate", "--weights", str(weights), "--out", str(report_dir), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    assert 0.0 <= result["val_acc"] <= 1.0
    per_class = result["per_class"]
    assert len(per_class) == config.model.num_classes
    images = sum(row["images"] for row in per_class)
    correct = sum(round(row["accuracy"] * row["images"]) for row in per_class if row["images"])
    assert correct / images == result["val_acc"]
    assert result["top_k"] == (5 if config.model.num_classes > 5 else 1)
    assert result["val_top_k_acc"] >= result["val_acc"]
    with open(report_dir / "confusion.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == [row["class"] for row in per_class]
    assert sum(int(count) for row in rows[1:] for count in row[1:]) == images
    with open(report_dir / "per_class.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)] == rows[0][1:]
    assert (report_dir / "confusion.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_prints_a_table_for_a_person(tmp_path, config, capsys):
    out = tmp_path / "run"
    fit(config, out, epochs=1, device="cpu")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "val_acc" in lines[0] and lines[2].split() == ["class", "images", "accuracy", "precision", "recall"]
    assert len(lines) == 3 + config.model.num_classes  # a row per class, not one JSON line


def test_evaluate_run_reads_the_runs_best_weights_and_config(tmp_path, config, capsys):
    out = tmp_path / "run"
    fit(config, out, epochs=1, device="cpu")  # a shrunken config: only the run's config.toml holds its sizes
    weights = out / "best.pt"
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--json"]) == 0
    by_run = json.loads(capsys.readouterr().out)
    assert main(["--config", str(out / "config.toml"), "evaluate", "--weights", str(weights), "--json"]) == 0
    assert by_run == json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "no best.safetensors, best.pt or last.ckpt" in capsys.readouterr().err


def test_evaluate_refuses_weights_changed_since_the_run_wrote_them(tmp_path, config, config_file, capsys):
    out = tmp_path / "run"
    fit(config, out, epochs=1, device="cpu")
    weights = out / "best.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte that may still load: only the recorded SHA-256 tells
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["--config", str(config_file), "evaluate", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{weights}" in err and "checkpoints.json" in err


def test_weights_of_another_model_are_summarised_in_one_line(tmp_path, config, config_file, capsys):
    other = {f"encoder.block{i}.weight": torch.zeros(3) for i in range(200)}
    torch.save(other, tmp_path / "other.pt")
    assert main(["--config", str(config_file), "evaluate", "--weights", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 600, err
    assert "0 of" in err and "missing in file" in err and "not in model: encoder.*" in err


def no_nan(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_the_report_says_null_where_there_is_nothing_to_divide_by():
    # Class 0: 3 images, all right; class 1: 1 image, called class 0; class 2: no images, never predicted.
    confusion = torch.tensor([[3, 0, 0], [1, 0, 0], [0, 0, 0]])
    result = finite_or_null(report(confusion, ["a", "b", "c"], float("nan"), 1, 0.75))
    assert result["val_loss"] is None and result["val_acc"] == 0.75
    a, b, c = result["per_class"]
    assert (a["precision"], a["recall"], a["accuracy"]) == (0.75, 1.0, 1.0)
    assert b["precision"] is None and b["recall"] == 0.0
    assert c["images"] == 0 and c["accuracy"] is None and c["precision"] is None
    json.dumps(result, allow_nan=False)
