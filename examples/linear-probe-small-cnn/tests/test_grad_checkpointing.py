"""Gradient checkpointing: the same gradients and BatchNorm statistics, behind a frozen prefix too."""

from __future__ import annotations

import pytest
import torch

from linear_probe_small_cnn.data import example_inputs
from linear_probe_small_cnn.grad_checkpointing import checkpoint_blocks
from linear_probe_small_cnn.model import blocks_with_parameters, build_model
from linear_probe_small_cnn.run import prepare_model


def test_checkpointed_blocks_behind_a_frozen_prefix_get_their_gradients(config):
    # Frozen: everything before the second block (the first block, and
    # parameters outside every block such as a ViT's position embedding).
    model = build_model(config)
    later = blocks_with_parameters(model)[1:]
    config.freeze.keep_trainable = later
    # BatchNorm that trains: the recompute must neither change the gradients nor count the batch twice.
    config.freeze.bn_modes = {"type:BatchNorm2d": "train"}
    x = example_inputs(config, 4)

    def prepared():
        torch.manual_seed(0)
        return prepare_model(config)[0]

    def gradients(model):
        model.train()
        model(x).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = prepared()
    expected = gradients(plain)
    model = prepared()
    blocks = checkpoint_blocks(model)
    assert len(blocks) >= 2
    got = gradients(model)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad is not None and torch.allclose(grad, expected[name], atol=1e-6), name
    for (name, buffer), reference in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(buffer, reference), f"{name}: the recompute changed the running statistics"

    # The trap the switch avoids: reentrant checkpointing drops them.
    model = prepared()
    second = model.get_submodule(blocks[1])
    forward = second.forward
    second.forward = lambda t: torch.utils.checkpoint.checkpoint(forward, t, use_reentrant=True)
    with pytest.warns(UserWarning, match="requires_grad"):
        lost = gradients(model)
    assert all(lost[f"{blocks[1]}.{n}"] is None for n, _ in second.named_parameters())
