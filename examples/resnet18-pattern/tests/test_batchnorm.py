"""BatchNorm policy replace_frozen: fixed statistics survive model.train() and training steps."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from resnet18_pattern.batchnorm import FrozenBatchNorm
from resnet18_pattern.data import make_datasets
from resnet18_pattern.train import make_optimizer, prepare_model, train_one_epoch


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
        assert isinstance(module, FrozenBatchNorm), name


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
    for key, value in before.items():
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


def test_replaced_layers_keep_batchnorm_state_dict_keys(config):
    from resnet18_pattern.model import build_model

    model, _ = prepare_model(config)
    plain = build_model(config["model"]["num_classes"]).state_dict()
    assert list(model.state_dict()) == list(plain)
