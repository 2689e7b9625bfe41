"""BatchNorm modes hold across train()/eval() and training steps; fixed means bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lora_resnet18.batchnorm import (
    BN_MODES,
    batchnorm_layers,
    mode_of,
    plain_layer,
    set_mode,
)
from lora_resnet18.data import DEFAULT_DATA, make_datasets
from lora_resnet18.freeze import FreezeSpecError
from lora_resnet18.lora import attach
from lora_resnet18.model import build_model
from lora_resnet18.optim import make_optimizer
from lora_resnet18.run import prepare_model
from lora_resnet18.train import train_one_epoch

STATS = ("running_mean", "running_var", "num_batches_tracked")


def with_mode(config, mode):
    """The render's own spec, with every BatchNorm layer put in `mode`."""
    config.freeze.bn_modes = {"type:BatchNorm2d": mode}
    model, _ = prepare_model(config)
    return model


def train_steps(model, config):
    train_set, _ = make_datasets(DEFAULT_DATA, config)
    optimizer = make_optimizer(model, config)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_one_epoch(model, loader, optimizer, torch.device("cpu"))


def toggle(model):
    """Every way user code flips modes: the model, each child, each layer, back and forth."""
    model.train()
    for module in model.modules():
        module.train()
    model.eval()
    model.train(True)


@pytest.mark.parametrize("mode", BN_MODES)
def test_mode_survives_any_train_and_eval_calls(config, mode):
    config.freeze.bn_modes = {"type:BatchNorm2d": mode}
    model, state = prepare_model(config)
    toggle(model)
    layers = batchnorm_layers(model)
    assert layers and set(state.bn_modes.values()) == {mode}
    for name, layer in layers.items():
        # mode_of cannot tell eval from eval+frozen_affine where the spec froze the affine anyway.
        assert mode_of(layer) == mode or mode == "eval" and mode_of(layer) == "eval+frozen_affine", name
        if mode != "frozen":
            assert layer.training == (mode == "train"), name


@pytest.mark.parametrize("mode", BN_MODES)
def test_tensors_stay_bit_identical_where_the_mode_fixes_them(config, mode):
    model = with_mode(config, mode)
    layers = batchnorm_layers(model)
    before = {f"{n}.{k}": v.clone() for n, m in layers.items() for k, v in m.state_dict().items()}
    trainable = {f"{n}.{k}" for n, m in layers.items() for k, p in m.named_parameters() if p.requires_grad}
    train_steps(model, config)
    after = {f"{n}.{k}": v for n, m in layers.items() for k, v in m.state_dict().items()}
    stats = [k for k in before if k.rsplit(".", 1)[1] in STATS]
    affine = [k for k in before if k.rsplit(".", 1)[1] in ("weight", "bias")]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "train":
        assert set(stats) <= moved, "a training BatchNorm updates its statistics"
    else:
        assert not moved & set(stats), f"fixed statistics moved: {sorted(moved & set(stats))}"
    if mode in ("eval+frozen_affine", "frozen"):
        assert not trainable and not moved & set(affine), "a fixed affine moved"
    else:
        assert moved & set(affine) == trainable & set(affine), "the affine trains exactly where its part trains"


@pytest.mark.parametrize("mode", ["eval", "eval+frozen_affine", "frozen"])
def test_fixed_statistics_normalise_the_same_in_train_and_eval(config, mode):
    model = with_mode(config, mode)
    name, layer = next(iter(batchnorm_layers(model).items()))
    x = torch.randn(4, layer.num_features, 5, 5)
    model.train()
    y_train = layer(x)
    model.eval()
    assert torch.equal(y_train, layer(x)), name


@pytest.mark.parametrize("mode", BN_MODES)
def test_modes_keep_the_state_dict_keys(config, mode):
    model = with_mode(config, mode)
    plain = build_model(config)
    attach(plain, config.lora)  # the adapters rename the layers they wrap, in every BatchNorm mode alike
    assert list(model.state_dict()) == list(plain.state_dict())


def test_the_policy_sets_the_default_mode_by_part(config):
    model, state = prepare_model(config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for name, layer in batchnorm_layers(model).items():
        in_frozen = any(f"{name}.{k}" in frozen for k, _ in layer.named_parameters())
        expected = "eval+frozen_affine" if in_frozen else "train"
        assert state.bn_modes[name] == expected == mode_of(layer), name


def test_later_selectors_override_earlier_ones(config):
    layers = list(batchnorm_layers(build_model(config)))
    config.freeze.bn_modes = {"type:BatchNorm2d": "frozen", layers[-1]: "train"}
    model, state = prepare_model(config)
    assert state.bn_modes[layers[-1]] == "train" and state.bn_modes[layers[0]] == "frozen"


def test_a_bad_mode_or_a_selector_without_batchnorm_is_an_error(config):
    config.freeze.bn_modes = {"type:BatchNorm2d": "fixed"}
    with pytest.raises(FreezeSpecError, match="a mode is one of train, eval"):
        prepare_model(config)
    config.freeze.bn_modes = {"type:Linear": "eval"}
    with pytest.raises(FreezeSpecError, match="holds no BatchNorm layer"):
        prepare_model(config)


class EveryKind(nn.Module):
    """BatchNorm1d, 2d and 3d, and SyncBatchNorm (which runs on CPU only in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1d, self.bn2d, self.bn3d, self.sync = (
            nn.BatchNorm1d(3),
            nn.BatchNorm2d(3),
            nn.BatchNorm3d(3),
            nn.SyncBatchNorm(3),
        )


@pytest.mark.parametrize("mode", ["eval", "eval+frozen_affine", "frozen"])
def test_every_batchnorm_class_is_covered(mode):
    torch.manual_seed(0)
    model = EveryKind()
    inputs = {"bn1d": torch.randn(4, 3), "bn2d": torch.randn(2, 3, 4, 4), "bn3d": torch.randn(2, 3, 2, 4, 4)}
    inputs["sync"] = inputs["bn2d"]
    for layer in model.children():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    expected = {name: getattr(model, name).eval()(x) for name, x in inputs.items()}
    for name in inputs:
        set_mode(model, name, mode)
    toggle(model)
    for name, x in inputs.items():
        layer = getattr(model, name)
        assert mode_of(layer) in (mode, "eval"), name  # requires_grad is the freeze engine's part
        assert torch.allclose(layer(x), expected[name], atol=1e-6), name
    for name in inputs:
        plain_layer(model, name)
    assert [type(m) for m in model.children()] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
