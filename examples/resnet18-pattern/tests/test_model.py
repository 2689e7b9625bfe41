"""resnet18: the head is replaced, and a failed download says what to do."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from resnet18_pattern.model import HEAD, PretrainedWeightsError, build_model


def test_head_has_one_output_per_class(config):
    model = build_model(config["model"]["num_classes"])
    assert model.get_submodule(HEAD).out_features == config["model"]["num_classes"]
    side = config["train"]["image_size"]
    assert model.eval()(torch.randn(2, 3, side, side)).shape == (2, config["model"]["num_classes"])


def test_offline_pretrained_download_points_to_init(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision fetches weights through torch.hub; make it fail as offline.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match="--init"):
        build_model(2, pretrained=True)
