"""The same guarantees on a GPU (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pretrained_like

from lora_resnet18.checkpoint import read_state_dict
from lora_resnet18.data import DEFAULT_DATA, make_datasets
from lora_resnet18.lr_find import lr_find
from lora_resnet18.run import prepare_model
from lora_resnet18.train import fit


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
def test_lr_find_on_cuda_puts_back_the_cuda_generator(config):
    model, state = prepare_model(config)
    train_set, _ = make_datasets(DEFAULT_DATA, config)
    torch.cuda.manual_seed_all(11)
    before = torch.cuda.get_rng_state_all()
    test = lr_find(model, state, config, train_set, torch.device("cuda"), 0, (1e-5, 1.0, 20))
    assert len(test.rows) >= 2
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), before, strict=True))
    assert all(p.device.type == "cpu" for p in model.parameters()), "lr-find moved the caller's model"


@pytest.mark.cuda
def test_a_cpu_run_resumes_on_the_gpu(tmp_path, config):
    """A run started on the CPU goes on on the GPU from its last.ckpt."""
    out = tmp_path / "run"
    fit(config, out, epochs=2, stop_after=1, device="cpu")
    history = fit(config, None, epochs=2, resume=out, device="cuda")
    assert [row["epoch"] for row in history] == [0, 1]
