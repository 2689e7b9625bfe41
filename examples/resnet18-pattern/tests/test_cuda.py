"""The same guarantees on a GPU, with mixed precision (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pretrained_like, to_toml, torchrun

from resnet18_pattern.checkpoint import RunFiles, read_state_dict
from resnet18_pattern.cli import main
from resnet18_pattern.data import DEFAULT_DATA, make_datasets
from resnet18_pattern.lr_find import lr_find
from resnet18_pattern.run import prepare_model
from resnet18_pattern.train import fit


@pytest.mark.cuda
def test_cuda_run_with_amp_keeps_frozen_tensors(tmp_path, config):
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
def test_plan_on_cuda_reports_peak_allocated_memory_that_grows_with_what_trains(tmp_path, config, capsys):
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(config))
    assert main(["--config", str(config_file), "plan", "--batches", "2", "--device", "cuda", "--json"]) == 0
    rows = {row["choice"]: row for row in json.loads(capsys.readouterr().out)}
    assert 0 < rows["linear probe"]["memory_bytes"] < rows["full fine-tune"]["memory_bytes"]


@pytest.mark.cuda
def test_torchrun_trains_on_every_gpu_with_nccl(tmp_path, config):
    """One process per GPU (one GPU is enough), AMP on, SyncBatchNorm for the BN that trains."""
    gpus = torch.cuda.device_count()
    config.train.sync_bn = True
    config.train.batch_size = 16 * gpus
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(config))
    out = tmp_path / "run"
    args = ["--config", str(config_file), "train", "--out", str(out), "--epochs", "2", "--device", "cuda"]
    proc = torchrun("-m", "resnet18_pattern", *args, processes=gpus)
    assert proc.stdout.count("epoch 1: train_loss") == 1
    files = RunFiles(out)
    for name in files.files:
        files.verify(name)
    assert (out / "metrics.csv").read_text().count("\n") == 3


@pytest.mark.cuda
def test_a_cpu_run_resumes_on_the_gpu(tmp_path, config):
    """The CPU run saved no GradScaler state (no AMP there); the GPU resume starts the scaler fresh."""
    out = tmp_path / "run"
    fit(config, out, epochs=2, stop_after=1, device="cpu")
    history = fit(config, None, epochs=2, resume=out, device="cuda")
    assert [row["epoch"] for row in history] == [0, 1]
    assert torch.load(out / "last.ckpt", weights_only=True)["scaler"], "the GPU epoch saved its scaler"
