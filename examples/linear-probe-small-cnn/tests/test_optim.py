"""Optimizer hygiene: trainable parameters only, few groups, no decay on norms and biases, per-part rates."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import frozen_names, has_params

from linear_probe_small_cnn.data import example_inputs
from linear_probe_small_cnn.freeze import FreezeSpecError
from linear_probe_small_cnn.model import BLOCK_CONTAINERS, HEAD, build_model
from linear_probe_small_cnn.train import (
    blocks_with_parameters,
    checkpoint_blocks,
    make_optimizer,
    optimizer_step,
    param_groups,
    prepare_model,
    trainable_names,
)


def groups_by_name(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_two_groups_split_by_weight_decay_only(config):
    model, _ = prepare_model(config)
    optimizer = make_optimizer(model, config)
    groups = groups_by_name(optimizer)
    assert set(groups) == {"trainable", "trainable no_decay"}
    params = dict(model.named_parameters())
    assert all(params[n].ndim <= 1 for n in names_in(model, groups["trainable no_decay"]))
    assert all(params[n].ndim > 1 for n in names_in(model, groups["trainable"]))
    assert groups["trainable no_decay"]["weight_decay"] == 0.0
    assert groups["trainable"]["weight_decay"] == config["train"]["weight_decay"]
    config["train"]["no_decay_norm_bias"] = False
    assert [g["name"] for g in make_optimizer(model, config).param_groups] == ["trainable"]


def test_frozen_parameters_never_enter_any_group(config):
    config["freeze"]["bn_modes"] = {"type:BatchNorm2d": "eval+frozen_affine"}
    model, _ = prepare_model(config)
    held = {n for g in make_optimizer(model, config).param_groups for n in names_in(model, g)}
    assert held == set(trainable_names(model))
    assert frozen_names(model) and not held & set(frozen_names(model))


def test_lr_mult_selectors_last_match_wins(config):
    config["train"]["no_decay_norm_bias"] = False
    config["train"]["lr_mult"] = {"*": 0.5, "head": 2.0}
    model = build_model(config)
    groups = param_groups(model, config, [n for n, _ in model.named_parameters()], "all")
    rate = {p: g["lr_mult"] for g in groups for p in g["params"]}
    head = {f"{HEAD}.{n}" for n, _ in model.get_submodule(HEAD).named_parameters()}
    assert {p for p, r in rate.items() if r == 2.0} == head
    assert {p for p, r in rate.items() if r == 0.5} == set(rate) - head
    assert [g["name"] for g in groups] == ["all lr x0.5", "all lr x2"]


def test_layer_decay_scales_each_block(config):
    config["train"]["layer_decay"] = 0.5
    config["train"]["no_decay_norm_bias"] = False
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
    config["train"]["lr_mult"] = {"ehad": 0.1}
    with pytest.raises(FreezeSpecError, match="train.lr_mult.*closest: head"):
        prepare_model(config)


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


def test_checkpointed_blocks_behind_a_frozen_prefix_get_their_gradients(config):
    # Frozen: everything before the second block (the first block, and
    # parameters outside every block such as a ViT's position embedding).
    model = build_model(config)
    later = blocks_with_parameters(model)[1:]
    config["freeze"]["keep_trainable"] = later
    # BatchNorm that trains: the recompute must neither change the gradients nor count the batch twice.
    config["freeze"]["bn_modes"] = {"type:BatchNorm2d": "train"}
    x = example_inputs(config, 4)

    def prepared():
        torch.manual_seed(0)
        return prepare_model(config)[0]

    def gradients(model):
        model.train()
        model(x).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = prepared()
    expected = gradients(plain)
    model = prepared()
    blocks = checkpoint_blocks(model)
    assert len(blocks) >= 2
    got = gradients(model)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad is not None and torch.allclose(grad, expected[name], atol=1e-6), name
    for (name, buffer), reference in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(buffer, reference), f"{name}: the recompute changed the running statistics"

    # The trap the switch avoids: reentrant checkpointing drops them.
    model = prepared()
    second = model.get_submodule(blocks[1])
    forward = second.forward
    second.forward = lambda t: torch.utils.checkpoint.checkpoint(forward, t, use_reentrant=True)
    with pytest.warns(UserWarning, match="requires_grad"):
        lost = gradients(model)
    assert all(lost[f"{blocks[1]}.{n}"] is None for n, _ in second.named_parameters())
