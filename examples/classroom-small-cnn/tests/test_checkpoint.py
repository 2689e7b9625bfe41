"""Loading someone else's weights with a report, refusing unsafe files, and saves that a crash cannot half-write."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import pretrained

from classroom_small_cnn import checkpoint
from classroom_small_cnn.config import UserError
from classroom_small_cnn.model import build_model

HEAD = "head"


@pytest.mark.exercise4
def test_init_strips_a_module_prefix_and_reports_a_wrong_shape(config, tmp_path: Path):
    state = pretrained(tmp_path / "init.pt", config)
    wrapped = {f"module.{k}": v for k, v in state.items()}
    head = f"module.{HEAD}.weight"
    wrapped[head] = torch.zeros(wrapped[head].shape[0] + 1, *wrapped[head].shape[1:])
    model = build_model(config)
    report = checkpoint.load_matching(model, wrapped, min_fraction=0.5)
    assert len(report["loaded"]) == len(state) - 1, "strip the module. prefix: every tensor but the head must load"
    assert [entry.split()[0] for entry in report["wrong shape"]] == [f"{HEAD}.weight"], report["wrong shape"]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in report["loaded"]), "copy what the report loaded"


@pytest.mark.exercise4
def test_init_first_n_loads_only_the_first_tensors_in_model_order(config, tmp_path: Path):
    state = pretrained(tmp_path / "init.pt", config)
    model = build_model(config)
    report = checkpoint.load_matching(model, state, min_fraction=0.0, first_n=2)
    assert report["loaded"] == list(model.state_dict())[:2]


@pytest.mark.exercise4
def test_init_below_the_threshold_is_refused_before_the_model_changes(config, tmp_path: Path):
    state = pretrained(tmp_path / "init.pt", config)
    model = build_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    few = dict(list(state.items())[:1])
    with pytest.raises(UserError):  # one tensor of many is not the pretrained model
        checkpoint.load_matching(model, few, min_fraction=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "refuse before changing the model"


@pytest.mark.exercise4
def test_integer_tensors_are_not_loaded_into_float_weights(config, tmp_path: Path):
    state = pretrained(tmp_path / "init.pt", config)
    state = {k: v.long() if v.is_floating_point() else v for k, v in state.items()}
    report = checkpoint.load_matching(build_model(config), state, min_fraction=0.0)
    assert report["wrong dtype"] and not any(k.endswith("weight") for k in report["loaded"])


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo owned > owned.txt",))


def test_a_file_that_would_run_code_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": RunsCode()}, protocol=2))
    with pytest.raises(UserError, match="refused, it holds more than tensors"):
        checkpoint.read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "owned.txt").exists()


def test_a_save_that_fails_midway_leaves_the_old_file_whole(tmp_path: Path, monkeypatch):
    path = tmp_path / "best.pt"
    checkpoint.atomic_write(path, b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        checkpoint.atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["best.pt"]


def test_a_save_never_writes_through_a_link(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").symlink_to(victim)
    checkpoint.atomic_write(tmp_path / "run" / "best.pt", b"weights")
    assert victim.read_text() == "keep" and not (tmp_path / "run" / "best.pt").is_symlink()
