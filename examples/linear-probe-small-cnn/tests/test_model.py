"""small_cnn: the head is replaced."""

from __future__ import annotations

from linear_probe_small_cnn.data import example_inputs
from linear_probe_small_cnn.freeze import resolve
from linear_probe_small_cnn.model import HEAD, build_model


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
