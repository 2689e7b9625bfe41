"""Exports reproduce the eager model, and a format that cannot be written says why."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from resnet18_pattern.cli import main
from resnet18_pattern.data import example_inputs
from resnet18_pattern.export import ExportError, export, export_classes
from resnet18_pattern.model import build_model

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = [
    "pt2",
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra is not installed")),
]


@pytest.fixture
def weights(tmp_path, config):
    torch.manual_seed(7)
    path = tmp_path / "best.pt"
    torch.save(build_model(config).state_dict(), path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_eager_and_reports_the_error(tmp_path, config_file, weights, capsys, fmt):
    out = tmp_path / f"model.{fmt}"
    args = ["--config", str(config_file), "export", "--weights", str(weights), "--format", fmt, "--out", str(out)]
    assert main(args) == 0
    assert out.stat().st_size > 0
    assert "max abs difference to eager on a batch of 2:" in capsys.readouterr().out


def test_pt2_export_keeps_the_batch_size_free(tmp_path, config, weights):
    model = build_model(config)
    model.load_state_dict(torch.load(weights, weights_only=True))
    export(model, "pt2", tmp_path / "m.pt2", example_inputs(config, 2))
    exported = torch.export.load(tmp_path / "m.pt2").module()
    x = example_inputs(config, 5)
    with torch.no_grad():
        assert torch.allclose(exported(x), model.eval()(x), atol=1e-5)


def test_onnx_without_its_extra_says_how_to_install_it(tmp_path, config, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # None makes the import fail
    with pytest.raises(ExportError, match=r"pip install -e '\.\[onnx\]'"):
        export(build_model(config), "onnx", tmp_path / "m.onnx", example_inputs(config, 2))
    assert not (tmp_path / "m.onnx").exists()


def test_exporting_weights_of_another_model_is_a_clear_error(tmp_path, config_file, capsys):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    args = ["--config", str(config_file), "export", "--weights", str(tmp_path / "other.pt"), "--format", "pt2"]
    assert main([*args, "--out", str(tmp_path / "m.pt2")]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_fold_bn_export_has_no_batchnorm_left_and_still_matches(tmp_path, config_file, config, weights, capsys):
    out = tmp_path / "folded.pt2"
    args = ["--config", str(config_file), "export", "--weights", str(weights), "--format", "pt2", "--out", str(out)]
    assert main([*args, "--fold-bn"]) == 0
    assert "BatchNorm folded into convolutions" in capsys.readouterr().out
    graph = str(torch.export.load(out).graph)
    assert "batch_norm" not in graph, "a BatchNorm after a convolution was not folded"
    model = build_model(config)
    model.load_state_dict(torch.load(weights, weights_only=True))
    x = example_inputs(config, 3)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(out).module()(x), model.eval()(x), atol=1e-4)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_a_failed_check_leaves_the_earlier_export_as_it_was(tmp_path, config, monkeypatch, fmt):
    from resnet18_pattern import export as exporting

    out = tmp_path / f"m.{fmt}"
    export(build_model(config), fmt, out, example_inputs(config, 2))
    before = out.read_bytes()
    monkeypatch.setattr(exporting, "TOLERANCE", -1.0)  # no export can pass: the check must fail
    with pytest.raises(ExportError, match="differs from eager"):
        export(build_model(config), fmt, out, example_inputs(config, 2))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "a temp file was left"


def test_a_pt2_export_logs_nothing_about_its_temp_file_name(tmp_path, config, caplog):
    export(build_model(config), "pt2", tmp_path / "m.pt2", example_inputs(config, 2))
    assert not [r for r in caplog.records if "Expect archive file" in r.getMessage()]


def test_an_export_to_a_full_disk_is_one_line_and_clears_its_own_stale_temp_files(tmp_path, config, monkeypatch):
    import shutil

    out = tmp_path / "m.pt2"
    export(build_model(config), "pt2", out, example_inputs(config, 2))
    before = out.read_bytes()
    stale, other = tmp_path / ".m.pt2.0123456789ab.tmp", tmp_path / ".m.onnx.0123456789ab.tmp"
    stale.write_bytes(b"left by a killed export")
    other.write_bytes(b"not this export's")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))  # a nearly full disk
    with pytest.raises(ExportError, match=r"m\.pt2: its disk has 0\.0 MiB free and this export needs about"):
        export(build_model(config), "pt2", out, example_inputs(config, 2))
    assert out.read_bytes() == before and not stale.exists() and other.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_carries_the_class_names(tmp_path, config, fmt):
    names = [f"kind_{i}" for i in range(config.model.num_classes)]
    out = tmp_path / f"m.{fmt}"
    export(build_model(config), fmt, out, example_inputs(config, 2), classes=names)
    assert export_classes(out) == names
