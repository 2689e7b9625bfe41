"""Frozen means cheap: no graph through a frozen prefix, and DataLoader defaults that fit the data."""

from __future__ import annotations

from conftest import linear_probe

from custom_char_model.data import DEFAULT_DATA, example_inputs
from custom_char_model.distributed import SINGLE
from custom_char_model.model import HEAD
from custom_char_model.run import loader_workers, prepare_model


def test_a_frozen_prefix_builds_no_autograd_graph(config):
    model, _ = prepare_model(linear_probe(config, "names"))
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
    assert loader_workers("auto", DEFAULT_DATA, SINGLE) == 0, "custom data is taken to be in memory"
