"""Every random number generator a training step draws from: seeding, and keeping them across lr-find.

Saved in full checkpoints too, for an exact resume.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # torch runs without numpy; then there is no numpy RNG to seed or keep
    np = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if np is not None:
        np.random.seed(seed)


@contextlib.contextmanager
def rngs_kept() -> Iterator[None]:
    """Run the block, then put back the Python, numpy and torch (CPU and CUDA) generators."""
    python = random.getstate()
    numpy = np.random.get_state() if np is not None else None
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(python)
            if numpy is not None:
                np.random.set_state(numpy)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as data weights_only=True loads."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": None,
    }
    if np is not None:
        # The Generator-style dict of numpy's global RNG, its key as a tensor:
        # a numpy array would need unsafe globals to unpickle.
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
        state["numpy"] = numpy_state
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["numpy"] is not None and np is not None:
        numpy_state = dict(state["numpy"])
        numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}
        np.random.set_state(numpy_state)
