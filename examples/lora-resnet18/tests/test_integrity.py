"""Freeze integrity: a fixed tensor that moves, or a release no param group holds, stops the run loudly."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lora_resnet18 import saving, train
from lora_resnet18.checkpoint import RunFiles, torch_bytes, torch_load
from lora_resnet18.integrity import IntegrityError, fixed_tensors


@pytest.fixture
def frozen_config(config):
    """Something frozen for the whole run: no stage releases it."""
    config.unfreeze.stages = []
    return config


def saved_epochs(out) -> set[int]:
    return {entry["epoch"] for entry in json.loads((out / "checkpoints.json").read_text())["files"].values()}


def test_a_write_into_a_frozen_tensor_stops_the_run_and_keeps_the_last_good_epoch(tmp_path, frozen_config, monkeypatch):
    real, hit = train.run_epoch, []

    def writes_under_no_grad(run, epoch):
        row = real(run, epoch)
        if epoch == 1:  # what an in-place init or a hand-rolled EMA does by mistake
            name, tensor = next(iter(fixed_tensors(run.model).items()))
            with torch.no_grad():
                tensor.add_(1)
            hit.append(name)
        return row

    monkeypatch.setattr(train, "run_epoch", writes_under_no_grad)
    out = tmp_path / "run"
    with pytest.raises(IntegrityError, match=r"epoch 1: 1 frozen tensors changed \((.+)\): something wrote") as err:
        train.fit(frozen_config, out, epochs=2, device="cpu")
    assert f"changed ({hit[0]})" in str(err.value)
    assert saved_epochs(out) == {0}, "nothing of the broken epoch may be saved"
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # the header and epoch 0


def test_a_release_that_no_param_group_holds_stops_the_run(tmp_path, frozen_config, monkeypatch):
    frozen_config.unfreeze.stages = [{"epoch": 1, "select": "*"}]
    monkeypatch.setattr(train, "add_groups", lambda *args, **kwargs: None)  # the forgotten add_param_group
    with pytest.raises(IntegrityError, match=r"epoch 1: \d+ trainable tensors are in no param group"):
        train.fit(frozen_config, tmp_path / "run", epochs=2, device="cpu")


def test_a_resume_whose_fixed_tensors_were_edited_is_refused(tmp_path, frozen_config):
    out = tmp_path / "run"
    train.fit(frozen_config, out, epochs=2, stop_after=1, device="cpu")
    checkpoint = torch_load(out / "last.ckpt")
    name = next(iter(checkpoint["integrity"]))
    checkpoint["model"][name] += 1  # and recorded as if the run wrote it: only the checksums can tell
    RunFiles(out).save("last.ckpt", torch_bytes(checkpoint), saving.full_info(checkpoint))
    with pytest.raises(IntegrityError, match=rf"--resume .*last\.ckpt: 1 fixed tensors differ .*\({re.escape(name)}\)"):
        train.fit(None, None, resume=out, device="cpu")
