"""The blog recipes in the generated README, each one selector spec, select what the recipe froze.

Each recipe is run on the real architecture it was written for (torchvision
VGG16, ResNet-50 and AlexNet, timm's ViT, the character model of the
articles), built on the meta device: selectors need names, not weights.
The reference is the recipe's own loop, written out as the articles do.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn

from scaffold.render import render
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def resolve(tmp_path_factory):
    project = render(tmp_path_factory.mktemp("recipes") / "p", {}, src=ROOT)
    sys.path.insert(0, str(project / "src"))
    try:
        freeze = importlib.import_module("finetune_demo.freeze")
    finally:
        sys.path.remove(str(project / "src"))

    def picked(model: nn.Module, spec: list) -> list[str]:
        return freeze.resolve(model, spec, "recipe")[1].params

    return picked


def build(factory, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return factory(*args, **kwargs)


class Char3SeqModel(nn.Module):
    """The articles' character model: an embedding and three linear layers."""

    def __init__(self, vocab: int = 40, factors: int = 10, hidden: int = 32) -> None:
        super().__init__()
        self.em = nn.Embedding(vocab, factors)
        self.fc1 = nn.Linear(factors, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, vocab)


def test_vgg16_features(resolve):
    model = build(torchvision.models.vgg16)
    expected = [n for n, _ in model.named_parameters() if n.startswith("features.")]
    assert resolve(model, ["features"]) == expected == resolve(model, ["features.*"])
    # The article's hand-typed list: 13 convolutions' weight and bias.
    assert len(expected) == 26


def test_resnet50_first_seven_children(resolve):
    model = build(torchvision.models.resnet50)
    expected = []
    for ct, child in enumerate(model.children()):
        if ct < 7:
            names = {id(p) for p in child.parameters()}
            expected += [n for n, p in model.named_parameters() if id(p) in names]
    assert resolve(model, ["idx:..7"]) == expected
    assert expected[-1].startswith("layer3."), "children 0-6 end with layer3"


def test_alexnet_convolutions(resolve):
    model = build(torchvision.models.alexnet)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    expected = [f"{c}.{k}" for c in convs for k in ("weight", "bias")]
    assert resolve(model, ["type:Conv2d"]) == expected == resolve(model, ["param_idx:0..10"])


def test_everything_but_the_classifier(resolve):
    model = build(torchvision.models.vgg16)
    assert resolve(model, ["!classifier"]) == [k for k, _ in model.named_parameters() if "classifier" not in k]


def test_vit_patch_embed_and_first_six_blocks(resolve):
    model = build(timm.create_model, "vit_tiny_patch16_224", pretrained=False)
    first_six = [["blocks", str(i)] for i in range(6)]
    expected = [n for n, _ in model.named_parameters() if n.startswith("patch_embed.") or n.split(".")[:2] in first_six]
    assert resolve(model, ["patch_embed", "blocks.[0-5].*"]) == expected
    assert resolve(model, ["patch_embed", r"re:^blocks\.[0-5]\."]) == expected


def test_char_model_fc1_and_fc3(resolve):
    model = Char3SeqModel()
    assert resolve(model, ["fc1", "fc3"]) == ["fc1.weight", "fc1.bias", "fc3.weight", "fc3.bias"]
    assert resolve(model, ["idx:..-1"]) == [n for n, _ in model.named_parameters() if not n.startswith("fc3.")]
