"""Per-part learning rates: lr_mult selectors and layer-wise decay."""

from __future__ import annotations

import math

import pytest
from conftest import has_params

from linear_probe_small_cnn.freeze import FreezeSpecError
from linear_probe_small_cnn.model import BLOCK_CONTAINERS, HEAD, blocks_with_parameters, build_model
from linear_probe_small_cnn.optim import param_groups
from linear_probe_small_cnn.run import prepare_model


def test_lr_mult_selectors_last_match_wins(config):
    config.train.no_decay_norm_bias = False
    config.train.lr_mult = {"*": 0.5, "head": 2.0}
    model = build_model(config)
    groups = param_groups(model, config, [n for n, _ in model.named_parameters()], "all")
    rate = {p: g["lr_mult"] for g in groups for p in g["params"]}
    head = {f"{HEAD}.{n}" for n, _ in model.get_submodule(HEAD).named_parameters()}
    assert {p for p, r in rate.items() if r == 2.0} == head
    assert {p for p, r in rate.items() if r == 0.5} == set(rate) - head
    assert [g["name"] for g in groups] == ["all lr x0.5", "all lr x2"]


def test_layer_decay_scales_each_block(config):
    config.train.layer_decay = 0.5
    config.train.no_decay_norm_bias = False
    model = build_model(config)
    blocks = blocks_with_parameters(model)
    assert HEAD == blocks[-1] or HEAD.startswith(blocks[-1] + "."), "the head is the last block"
    for container in BLOCK_CONTAINERS:
        inner = [f"{container}.{n}" for n, c in model.get_submodule(container).named_children() if has_params(c)]
        assert all(n in blocks or n in BLOCK_CONTAINERS for n in inner), f"{container} is counted by its children"
    groups = param_groups(model, config, [n for n, _ in model.named_parameters()], "all")
    rate = {p: g["lr_mult"] for g in groups for p in g["params"]}
    for depth, block in enumerate(reversed(blocks)):
        for name, _ in model.get_submodule(block).named_parameters():
            assert math.isclose(rate[f"{block}.{name}"], 0.5**depth), (block, depth)
    outside = [n for n in rate if not any(n.startswith(b + ".") for b in blocks)]
    assert all(math.isclose(rate[n], 0.5 ** (len(blocks) - 1)) for n in outside), "they go with the first block"
    assert len(groups) == len(blocks), "one group per distinct rate"


def test_an_lr_mult_selector_with_a_typo_is_an_error(config):
    config.train.lr_mult = {"ehad": 0.1}
    with pytest.raises(FreezeSpecError, match="train.lr_mult.*closest: head"):
        prepare_model(config)
