"""resnet18: the head is replaced, and a failed download says what to do."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from lora_resnet18.data import example_inputs
from lora_resnet18.freeze import resolve
from lora_resnet18.model import HEAD, PretrainedWeightsError, build_model


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


def test_offline_pretrained_download_points_to_init(monkeypatch, config):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision fetches weights through torch.hub; make it fail as offline.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match="--init"):
        build_model(config, pretrained=True)
