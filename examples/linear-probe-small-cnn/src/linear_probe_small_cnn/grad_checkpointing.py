"""Gradient checkpointing: recompute each block's activations in backward instead of storing them.

Less memory for about one more forward pass of time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .model import blocks_with_parameters


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Recompute each block's activations in backward instead of keeping them.

    use_reentrant=False always: the reentrant variant returns no gradients
    for a block whose input does not require grad, which is every block
    behind a frozen prefix. The head (the last block) is left alone; its
    activations are small.
    """
    blocks = blocks_with_parameters(model)[:-1]
    for name in blocks:
        child = model.get_submodule(name)
        forward, contexts = child.forward, functools.partial(_recompute_contexts, child)
        child.forward = functools.partial(activation_checkpoint, forward, use_reentrant=False, context_fn=contexts)
    return blocks


def _recompute_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), _batchnorm_counts_once(block)


@contextlib.contextmanager
def _batchnorm_counts_once(block: nn.Module) -> Iterator[None]:
    """The recompute runs the block's forward again: BatchNorm must not count the batch twice.

    Its output is the same either way (batch statistics); only the running
    statistics would take a second momentum step, so they are put back,
    also when torch stops the recompute early by raising through here.
    """
    batchnorm = nn.modules.batchnorm._BatchNorm
    training = [m for m in block.modules() if isinstance(m, batchnorm) and m.training and m.track_running_stats]
    saved = [[buffer.clone() for buffer in m.buffers(recurse=False)] for m in training]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, values in zip(training, saved, strict=True):
                for buffer, value in zip(module.buffers(recurse=False), values, strict=True):
                    buffer.copy_(value)
