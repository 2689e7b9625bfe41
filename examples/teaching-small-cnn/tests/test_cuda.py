"""The same guarantees on a GPU (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pretrained_like

from teaching_small_cnn.checkpoint import read_state_dict
from teaching_small_cnn.train import fit


@pytest.mark.cuda
def test_cuda_run_keeps_frozen_tensors(tmp_path, config):
    init = pretrained_like(tmp_path / "init.pt", config)
    history = fit(config, tmp_path / "run", epochs=2, init=tmp_path / "init.pt", device="cuda")
    assert history[-1]["val_acc"] > 1 / config.model.num_classes
    manifest = json.loads((tmp_path / "run" / "freeze_manifest.json").read_text())
    final = read_state_dict(tmp_path / "run" / "last.ckpt")
    for name in manifest["frozen"]:
        assert torch.equal(final[name].cpu(), init[name]), name


@pytest.mark.cuda
def test_a_cpu_run_resumes_on_the_gpu(tmp_path, config):
    """A run started on the CPU goes on on the GPU from its last.ckpt."""
    out = tmp_path / "run"
    fit(config, out, epochs=2, stop_after=1, device="cpu")
    history = fit(config, None, epochs=2, resume=out, device="cuda")
    assert [row["epoch"] for row in history] == [0, 1]
