"""Frozen means cheap: no graph through a frozen prefix, cached features for a linear probe, sane defaults."""

from __future__ import annotations

import pytest
import torch
from conftest import shrink

from staged_small_cnn.config import ConfigError
from staged_small_cnn.data import DEFAULT_DATA, example_inputs, make_datasets
from staged_small_cnn.distributed import SINGLE, World
from staged_small_cnn.features import cache_decision
from staged_small_cnn.model import HEAD
from staged_small_cnn.train import amp_dtype, fit, loader_workers, prepare_model, use_channels_last


def linear_probe(config: dict) -> dict:
    """Only the head trains and every BatchNorm outside it is fixed: the case caching is for."""
    config["freeze"]["names"] = ["!head"]
    config["freeze"]["bn_modes"] = {"type:BatchNorm2d": "eval+frozen_affine"}
    config["unfreeze"]["stages"] = []
    return config


def head_of(model):
    return {n: p.detach().clone() for n, p in model.get_submodule(HEAD).named_parameters()}


def fitted(config, tmp_path, name, monkeypatch, **options):
    """fit(), and the model it trained."""
    from staged_small_cnn import train

    models = []
    real = train.prepare_model

    def keep(*args, **kwargs):
        model, state = real(*args, **kwargs)
        models.append(model)
        return model, state

    monkeypatch.setattr(train, "prepare_model", keep)
    history = fit(config, tmp_path / name, device="cpu", **options)
    return models[0], history


def test_a_frozen_prefix_builds_no_autograd_graph(config):
    model, _ = prepare_model(linear_probe(config))
    outputs = {}
    for name, child in model.named_children():
        child.register_forward_hook(lambda module, args, out, name=name: outputs.setdefault(name, out))
    model.train()
    model(example_inputs(config, 2)).sum().backward()
    children = [name for name, _ in model.named_children()]
    top = HEAD.split(".")[0]  # the child holding the head
    for name in children[: children.index(top)]:
        if name in outputs:  # some children are never called
            assert outputs[name].grad_fn is None, f"{name} recorded a graph though nothing in or before it trains"
    assert outputs[top].grad_fn is not None


def test_cached_and_uncached_training_give_the_same_head(tmp_path, config, monkeypatch, capsys):
    linear_probe(config)
    config["train"]["cache_features"] = False
    plain, plain_history = fitted(config, tmp_path, "plain", monkeypatch)
    assert "feature cache: off (train.cache_features = false)" in capsys.readouterr().out
    config["train"]["cache_features"] = "auto"
    cached, cached_history = fitted(config, tmp_path, "cached", monkeypatch)
    assert "feature cache: on (only the head trains" in capsys.readouterr().out
    for name, value in head_of(plain).items():
        assert torch.allclose(head_of(cached)[name], value, atol=1e-5), name
    one_sample = 1 / len(make_datasets(DEFAULT_DATA, config)[1])
    for a, b in zip(plain_history, cached_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=one_sample)
    for key, value in plain.state_dict().items():
        if not key.startswith(HEAD + "."):
            assert torch.equal(value, cached.state_dict()[key]), f"{key}: the backbone moved"


def test_the_cache_is_dropped_when_a_stage_unfreezes(tmp_path, config, monkeypatch, capsys):
    linear_probe(config)
    config["unfreeze"]["stages"] = [{"epoch": 1, "select": "*"}]
    torch.manual_seed(config["train"]["seed"])  # the initial weights fit() will build
    model, _ = prepare_model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shrink(config, 64, 32)
    trained, _ = fitted(config, tmp_path, "run", monkeypatch, epochs=2)
    printed = capsys.readouterr().out
    assert "feature cache: on" in printed and "epoch 1: feature cache dropped" in printed
    backbone = [n for n in before if not n.startswith(HEAD + ".")]
    after = dict(trained.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in backbone), "the backbone did not train"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bn_modes": {"type:BatchNorm2d": "train"}}, "updates its statistics"),
        # The first parameter tensor trains too.
        ({"names": ["!head", "!param_idx:0"]}, "outside the head train"),
    ],
)
def test_auto_says_why_it_does_not_cache_and_true_refuses(config, change, reason):
    linear_probe(config)
    config["freeze"].update(change)
    model, _ = prepare_model(config)
    on, why = cache_decision(model, "auto", [])
    assert not on and reason in why
    with pytest.raises(ConfigError, match="train.cache_features = true, but"):
        cache_decision(model, True, [])
    on, why = cache_decision(model, "auto", ["training images are randomly augmented"])
    assert not on and "augmented" in why
    with pytest.raises(ConfigError, match='must be true, false or "auto"'):
        cache_decision(model, "yes", [])


def test_bf16_autocast_on_the_cpu_trains_and_keeps_frozen_tensors(tmp_path, config, monkeypatch):
    config["train"]["cpu_amp"] = True
    assert amp_dtype(config["train"], torch.device("cpu")) is torch.bfloat16
    torch.manual_seed(config["train"]["seed"])  # the initial weights fit() will build
    model, _ = prepare_model(config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    shrink(config, 64, 32)
    trained, history = fitted(config, tmp_path, "run", monkeypatch, epochs=1)
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    after = dict(trained.named_parameters())
    assert all(torch.equal(value, after[n].detach()) for n, value in frozen.items())


def test_precision_and_layout_defaults_per_device(config):
    train_cfg = config["train"]
    assert amp_dtype(train_cfg, torch.device("cpu")) is None, "the CPU runs fp32 unless cpu_amp is set"
    assert amp_dtype({**train_cfg, "amp_dtype": "float16"}, torch.device("cuda")) is torch.float16
    assert amp_dtype({**train_cfg, "amp": False}, torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="amp_dtype"):
        amp_dtype({**train_cfg, "amp_dtype": "fp8"}, torch.device("cpu"))
    model, _ = prepare_model(config)
    assert use_channels_last("auto", model, torch.device("cuda")) is True
    assert use_channels_last("auto", model, torch.device("cpu")) is False
    assert loader_workers("auto", "synthetic", SINGLE) == 0, "synthetic data is in memory"
    assert 1 <= loader_workers("auto", "/data/images", SINGLE) <= 8
    assert loader_workers("auto", "/data/images", World(rank=0, size=64)) == 1
    with pytest.raises(ConfigError, match="num_workers"):
        loader_workers(-1, "synthetic", SINGLE)


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

    torch.manual_seed(config["train"]["seed"])
    frozen = {n: p.detach().clone() for n, p in prepare_model(config)[0].named_parameters() if not p.requires_grad}
    config["train"]["channels_last"] = True
    shrink(config, 64, 32)
    trained, history = fitted(config, tmp_path, "nhwc", monkeypatch, epochs=1)
    params = dict(trained.named_parameters())
    assert all(torch.equal(value, params[n].detach()) for n, value in frozen.items())
