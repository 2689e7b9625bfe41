"""custom: the head is found."""

from __future__ import annotations

import pytest
from torch import nn

from custom_char_model.config import ConfigError
from custom_char_model.data import example_inputs
from custom_char_model.freeze import resolve
from custom_char_model.model import HEAD, build_model


def test_head_has_one_output_per_class(config):
    model = build_model(config)
    num_classes = config.model.num_classes
    assert model.get_submodule(HEAD).out_features == num_classes
    assert model.eval()(example_inputs(config, 2)).shape == (2, num_classes)


def test_backbone_mode_freezes_everything_but_the_head(config):
    model = build_model(config)
    _, everything_but_head = resolve(model, ["!" + HEAD], "test")
    head = [f"{HEAD}.{name}" for name, _ in model.get_submodule(HEAD).named_parameters()]
    assert sorted(everything_but_head.params + head) == sorted(name for name, _ in model.named_parameters())


def test_factory_errors_name_the_answer(monkeypatch, config):
    import custom_char_model.model as model_module

    monkeypatch.setattr(model_module, "MODEL_FACTORY", "no_such_module_here:build")
    with pytest.raises(ConfigError, match="custom_model = 'no_such_module_here:build': cannot import"):
        build_model(config)
    monkeypatch.setattr(model_module, "MODEL_FACTORY", "custom_char_model.model:no_such_function")
    with pytest.raises(ConfigError, match="has no function no_such_function"):
        build_model(config)


def test_a_head_that_is_not_in_the_model_lists_the_modules(monkeypatch, config):
    import custom_char_model.model as model_module

    monkeypatch.setattr(model_module, "HEAD", "classifier")
    with pytest.raises(ConfigError, match="custom_head 'classifier' is not a module"):
        build_model(config)
    monkeypatch.undo()
    assert isinstance(build_model(config), nn.Module)
