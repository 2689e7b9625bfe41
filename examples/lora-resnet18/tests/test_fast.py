"""Frozen means cheap: no graph through a frozen prefix, and DataLoader defaults that fit the data."""

from __future__ import annotations

from conftest import linear_probe

from lora_resnet18.data import example_inputs
from lora_resnet18.model import HEAD
from lora_resnet18.run import loader_workers, prepare_model


def test_a_frozen_prefix_builds_no_autograd_graph(config):
    model, _ = prepare_model(linear_probe(config, "keep_trainable"))
    outputs = {}
    for name, child in model.named_children():
        child.register_forward_hook(lambda module, args, out, name=name: outputs.setdefault(name, out))
    model.train()
    model(example_inputs(config, 2)).sum().backward()
    children = [name for name, _ in model.named_children()]
    top = HEAD.split(".")[0]  # the child holding the head
    for name in children[: children.index(top)]:
        if name in outputs:  # some children are never called
            assert outputs[name].grad_fn is None, f"{name} recorded a graph though nothing in or before it trains"
    assert outputs[top].grad_fn is not None


def test_loader_workers_fit_the_data():
    assert loader_workers("auto", "synthetic") == 0, "synthetic data is in memory"
    assert 1 <= loader_workers("auto", "/data/images") <= 8
