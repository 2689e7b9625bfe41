"""BatchNorm policy eval_all: fixed statistics survive model.train() and training steps."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from staged_small_cnn.batchnorm import BATCHNORM_TYPES
from staged_small_cnn.data import make_datasets
from staged_small_cnn.train import make_optimizer, prepare_model, train_one_epoch


def fixed_modules(model, manifest):
    assert manifest["bn_fixed"], "the policy fixed no BatchNorm layer"
    return {name: model.get_submodule(name) for name in manifest["bn_fixed"]}


def snapshot(modules):
    states = {name: module.state_dict() for name, module in modules.items()}
    return {f"{name}.{key}": value.clone() for name, state in states.items() for key, value in state.items()}


def test_fixed_layers_stay_fixed_across_train_calls(config):
    model, manifest = prepare_model(config)
    fixed = fixed_modules(model, manifest)
    model.train()
    for child in model.children():
        child.train()
    model.eval()
    model.train(True)
    for name, module in fixed.items():
        assert isinstance(module, BATCHNORM_TYPES) and not module.training, name


def test_statistics_are_bit_identical_after_training_steps(config):
    model, manifest = prepare_model(config)
    fixed = fixed_modules(model, manifest)
    before = snapshot(fixed)
    train_set, _ = make_datasets("synthetic", config)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = DataLoader(train_set, batch_size=32, shuffle=True)
    train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), use_amp=False)
    after = snapshot(fixed)
    params = dict(model.named_parameters())
    for key, value in before.items():
        if key in params and params[key].requires_grad:
            continue  # eval_all fixes statistics; affine trains where its module does
        assert torch.equal(value, after[key]), f"{key} changed"


def test_fixed_layer_normalises_the_same_in_train_and_eval(config):
    model, manifest = prepare_model(config)
    name, module = next(iter(fixed_modules(model, manifest).items()))
    channels = module.num_features
    x = torch.randn(4, channels, 5, 5)
    model.train()
    y_train = module(x)
    model.eval()
    assert torch.equal(y_train, module(x)), name


def test_every_batchnorm_is_fixed(config):
    model, manifest = prepare_model(config)
    every = [name for name, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES)]
    assert sorted(manifest["bn_fixed"]) == sorted(every)
