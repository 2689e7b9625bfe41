"""Loading is partial but loud, never runs code, and saving never tears a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from resnet18_pattern.checkpoint import CheckpointError, atomic_write, load_matching, read_state_dict, torch_load
from resnet18_pattern.model import HEAD, build_model
from resnet18_pattern.train import fit


def test_partial_load_skips_shape_mismatches_and_reports_them(tmp_path, config):
    num_classes = config["model"]["num_classes"]
    source = build_model(num_classes + 1).state_dict()
    torch.save({"model": {f"_orig_mod.module.{k}": v for k, v in source.items()}}, tmp_path / "w.pt")
    model = build_model(num_classes)
    report = load_matching(model, tmp_path / "w.pt", min_loaded_fraction=0.5)
    assert {key for key, _, _ in report.mismatched} == {f"{HEAD}.weight", f"{HEAD}.bias"}
    assert not report.missing and not report.unexpected
    state = model.state_dict()
    for key in report.loaded:
        assert torch.equal(state[key], source[key])
    assert "shape mismatch" in report.format()


def test_a_file_that_matches_too_little_is_refused(tmp_path, config):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="refusing to train from it"):
        load_matching(build_model(config["model"]["num_classes"]), tmp_path / "other.pt", 0.5)


class RunsCode:
    """Pickles into a call of os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "zeroed", "random"])
def test_damaged_files_raise_one_typed_error_naming_the_file(tmp_path, config, damage):
    path = tmp_path / "model.pt"
    torch.save(build_model(config["model"]["num_classes"]).state_dict(), path)
    data = path.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "zeroed":
        middle = len(data) // 2
        data = data[: middle - 512] + bytes(1024) + data[middle + 512 :]
    else:
        data = os.urandom(len(data))
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="model.pt"):
        read_state_dict(path)


def test_a_crash_mid_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda f: f.write(b"good"))

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [path], "a temp file was left behind"


def test_resumed_run_equals_uninterrupted_run(tmp_path, config):
    epochs = 3
    fit(config, tmp_path / "straight", epochs=epochs, device="cpu")
    fit(config, tmp_path / "split", epochs=epochs, stop_after=epochs - 1, device="cpu")
    history = fit(config, tmp_path / "split", epochs=epochs, resume=tmp_path / "split" / "last.ckpt", device="cpu")
    assert [row["epoch"] for row in history] == list(range(epochs))
    straight = torch_load(tmp_path / "straight" / "last.ckpt")
    split = torch_load(tmp_path / "split" / "last.ckpt")
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    assert straight["optimizer"]["state"].keys() == split["optimizer"]["state"].keys()
    assert (tmp_path / "straight" / "metrics.csv").read_text().count("\n") == epochs + 1


def test_safetensors_holds_the_same_weights_as_the_model(tmp_path, config):
    from resnet18_pattern.checkpoint import save_safetensors

    state = build_model(config["model"]["num_classes"]).state_dict()
    save_safetensors(state, tmp_path / "w.safetensors", {"epoch": "0"})
    loaded = read_state_dict(tmp_path / "w.safetensors")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
