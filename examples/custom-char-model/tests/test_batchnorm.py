"""BatchNorm modes hold across train()/eval() and training steps; fixed means bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from custom_char_model.batchnorm import (
    mode_of,
    plain_layer,
    set_mode,
)
from custom_char_model.freeze import FreezeSpecError
from custom_char_model.run import prepare_model


def toggle(model):
    """Every way user code flips modes: the model, each child, each layer, back and forth."""
    model.train()
    for module in model.modules():
        module.train()
    model.eval()
    model.train(True)


def test_bn_modes_on_a_model_without_batchnorm_is_an_error(config):
    config.freeze.bn_modes = {"*": "eval"}
    with pytest.raises(FreezeSpecError, match="holds no BatchNorm layer"):
        prepare_model(config)
    config.freeze.bn_modes = {"*": "fixed"}
    with pytest.raises(FreezeSpecError, match="a mode is one of train, eval"):
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
