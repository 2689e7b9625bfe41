"""Optimizer hygiene: trainable parameters only, few groups, no decay on norms and biases."""

from __future__ import annotations

import torch
from conftest import frozen_names
from torch import nn

from staged_small_cnn.data import example_inputs
from staged_small_cnn.optim import make_optimizer, trainable_names
from staged_small_cnn.run import prepare_model


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
    assert groups["trainable"]["weight_decay"] == config.train.weight_decay
    config.train.no_decay_norm_bias = False
    assert [g["name"] for g in make_optimizer(model, config).param_groups] == ["trainable"]


def test_frozen_parameters_never_enter_any_group(config):
    config.freeze.bn_modes = {"type:BatchNorm2d": "eval+frozen_affine"}
    model, _ = prepare_model(config)
    held = {n for g in make_optimizer(model, config).param_groups for n in names_in(model, g)}
    assert held == set(trainable_names(model))
    assert frozen_names(model) and not held & set(frozen_names(model))


def test_sgd_moves_only_what_trains_and_keeps_momentum_for_it_alone(config):
    """train.optimizer = "sgd": momentum and weight decay, like AdamW's state, touch trainable tensors only."""
    config.train.optimizer, config.train.momentum, config.train.weight_decay = "sgd", 0.9, 0.1
    model, _ = prepare_model(config)
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.SGD)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = example_inputs(config, 4)
    labels = torch.arange(4) % config.model.num_classes
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    frozen = frozen_names(model)
    assert frozen and all(torch.equal(params[name], before[name]) for name in frozen)
    assert any(not torch.equal(params[name], before[name]) for name in trainable_names(model))
    momentum = {id(p) for p, state in optimizer.state.items() if "momentum_buffer" in state}
    assert momentum and momentum <= {id(params[name]) for name in trainable_names(model)}
