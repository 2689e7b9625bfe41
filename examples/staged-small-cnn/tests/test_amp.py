"""Mixed precision and channels_last: the defaults per device, and frozen tensors that stay frozen under both."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import fitted, shrink

from staged_small_cnn.config import ConfigError, load_config
from staged_small_cnn.data import example_inputs
from staged_small_cnn.optim import make_optimizer, optimizer_step
from staged_small_cnn.run import amp_dtype, prepare_model, use_channels_last


def test_bf16_autocast_on_the_cpu_trains_and_keeps_frozen_tensors(tmp_path, config, monkeypatch):
    config.train.cpu_amp = True
    assert amp_dtype(config.train, torch.device("cpu")) is torch.bfloat16
    torch.manual_seed(config.train.seed)  # the initial weights fit() will build
    model, _ = prepare_model(config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    shrink(config, 64, 32)
    trained, history = fitted(config, tmp_path, "run", monkeypatch, epochs=1)
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    after = dict(trained.named_parameters())
    assert all(torch.equal(value, after[n].detach()) for n, value in frozen.items())


def test_precision_and_layout_defaults_per_device(tmp_path, config):
    train_cfg = config.train
    assert amp_dtype(train_cfg, torch.device("cpu")) is None, "the CPU runs fp32 unless cpu_amp is set"
    assert amp_dtype(replace(train_cfg, amp_dtype="float16"), torch.device("cuda")) is torch.float16
    assert amp_dtype(replace(train_cfg, amp=False), torch.device("cuda")) is None
    path = tmp_path / "fp8.toml"
    path.write_text('[train]\namp_dtype = "fp8"\nchannels_last = "yes"\n')
    with pytest.raises(ConfigError, match='train.amp_dtype = .fp8.: must be "auto" or "bfloat16" or "float16"'):
        load_config(path)
    model, _ = prepare_model(config)
    assert use_channels_last("auto", model, torch.device("cuda")) is True
    assert use_channels_last("auto", model, torch.device("cpu")) is False


def test_channels_last_computes_what_nchw_computes(tmp_path, config, monkeypatch):
    model, _ = prepare_model(config)
    x = example_inputs(config, 4)
    model.train()
    torch.manual_seed(0)  # the same masks for any dropout or stochastic depth in both passes
    expected = model(x)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    got = model(x.to(memory_format=torch.channels_last))
    got.square().mean().backward()
    # Other kernels sum in another order (measured on resnet18: 5e-5 on the
    # logits, 4e-4 of a gradient's largest entry); a layout mix-up is O(1).
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-4)
    for name, grad in grads.items():
        error = (dict(model.named_parameters())[name].grad - grad).abs().max()
        # The floor: a random-init model whose gradients are all ~1e-12 is noise either way.
        assert error <= 3e-3 * grad.abs().max() + 1e-8, f"{name}: {error}"

    torch.manual_seed(config.train.seed)
    frozen = {n: p.detach().clone() for n, p in prepare_model(config)[0].named_parameters() if not p.requires_grad}
    config.train.channels_last = True
    shrink(config, 64, 32)
    trained, history = fitted(config, tmp_path, "nhwc", monkeypatch, epochs=1)
    params = dict(trained.named_parameters())
    assert all(torch.equal(value, params[n].detach()) for n, value in frozen.items())


def test_the_scaler_is_skipped_when_no_parameter_got_a_gradient(config):
    model, _ = prepare_model(config)
    optimizer = make_optimizer(model, config)
    # A backward that reaches none of the optimizer's parameters, through an
    # enabled scaler as on CUDA with AMP: GradScaler.step raises on it.
    elsewhere = torch.ones((), requires_grad=True)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(elsewhere * 2).backward()
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.step(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(elsewhere * 2).backward()
    assert optimizer_step(optimizer, scaler) is False
    scaler.scale(model(example_inputs(config, 2)).sum()).backward()
    assert optimizer_step(optimizer, scaler) is True
