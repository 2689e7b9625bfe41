"""The same guarantees on a GPU, with mixed precision (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from resnet18_pattern.checkpoint import read_state_dict
from resnet18_pattern.model import build_model
from resnet18_pattern.train import fit


@pytest.mark.cuda
def test_cuda_run_with_amp_keeps_frozen_tensors(tmp_path, config):
    torch.manual_seed(7)
    init = build_model(config["model"]["num_classes"]).state_dict()
    torch.save(init, tmp_path / "init.pt")
    history = fit(config, tmp_path / "run", epochs=2, init=tmp_path / "init.pt", device="cuda")
    assert history[-1]["val_acc"] > 1 / config["model"]["num_classes"]
    manifest = json.loads((tmp_path / "run" / "freeze_manifest.json").read_text())
    final = read_state_dict(tmp_path / "run" / "last.ckpt")
    for name in manifest["frozen"]:
        assert torch.equal(final[name].cpu(), init[name]), name
