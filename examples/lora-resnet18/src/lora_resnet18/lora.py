"""LoRA adapters through peft: what they attach to, the merged weights, the adapter file.

freeze_by = "lora" freezes every base weight and trains, beside the head,
a low-rank update B @ A on each module of [lora] target: the model computes
W x + (alpha / rank) * B A x. Only A and B train, so an optimizer holds a few
percent of the parameters and their Adam state.

Two files come out of a run:
  best.pt / best.safetensors  the merged weights (W + scale * B A) under the
                              base model's own names: a plain state_dict that
                              a model built without peft loads.
  best_adapter.safetensors    what differs from the base: the adapters, the
                              head and every buffer (BatchNorm's running
                              statistics, which peft's own save leaves out).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .checkpoint import CheckpointError, read_state_dict
from .config import LoraConfig
from .freeze import FreezeSpecError, Selector, resolve
from .model import HEAD

# What peft can adapt and merge back into one weight.
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
# The selector that keeps the adapters trainable: peft names them lora_A, lora_B.
ADAPTERS = r"re:\.lora_"
ADAPTER_FILE = "best_adapter.safetensors"


def targets(model: nn.Module, selectors: list[Selector]) -> list[str]:
    """The modules of the selection that get adapters, in model order.

    A selection names a region; inside it, every Linear, Conv1d, Conv2d and
    Embedding is adapted, except two kinds that peft cannot merge: grouped
    (depthwise) convs, and the out_proj of nn.MultiheadAttention, whose
    forward reads its weight without calling it.
    """
    _, match = resolve(model, selectors, "lora.target")
    in_attention = {
        f"{name}.{child}"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child
    }
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, ADAPTABLE) or not match.covers(name, module):
            continue
        if name == HEAD or name.startswith(HEAD + "."):
            raise FreezeSpecError(f"lora.target: {name} is the head, which trains in full; take it out of the target")
        if name not in in_attention and getattr(module, "groups", 1) == 1:
            chosen.append(name)
    if not chosen:
        raise FreezeSpecError(
            f"lora.target {selectors}: no Linear, Conv or Embedding that LoRA can adapt in the selection "
            "(grouped convs and nn.MultiheadAttention's out_proj are left out)"
        )
    return chosen


def attach(model: nn.Module, config: LoraConfig) -> list[str]:
    """Put an adapter on each target; the base weights stay as they are (B starts at zero).

    An empty target attaches nothing: only keep_trainable trains, a linear probe.
    """
    if not config.target:
        return []
    names = targets(model, config.target)
    # fullmatch on the whole name: peft's list form matches by suffix, so
    # "conv1" would adapt layer1.0.conv1 too.
    pattern = "^(" + "|".join(map(re.escape, names)) + ")$"
    settings = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=pattern
    )
    peft.inject_adapter_in_model(settings, model)
    return names


def adapted(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def describe(model: nn.Module) -> str:
    """One line for the freeze summary: where the adapters sit."""
    names = adapted(model)
    if not names:
        return "LoRA: no adapters (lora.target = []): only keep_trainable trains"
    shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
    first = model.get_submodule(names[0])
    rank, scale = first.r["default"], first.scaling["default"]
    return f"LoRA (rank {rank}, scale alpha/rank = {scale:g}) on {len(names)} modules: {shown}"


@torch.no_grad()
def merged_state_dict(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain state_dict of the adapted model (or of `weights` in it): each weight plus its LoRA update."""
    if weights is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(weights)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    plain = {}
    for key, tensor in model.state_dict().items():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is None:
            plain[key] = tensor
            continue
        rest = key[len(owner) + 1 :]
        if not rest.startswith("base_layer."):
            continue  # the adapter's own A and B, merged below
        rest = rest.removeprefix("base_layer.")
        if rest == "weight":
            tensor = tensor + layers[owner].get_delta_weight("default").to(tensor.dtype)
        plain[f"{owner}.{rest}"] = tensor
    return plain


def adapter_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What best_adapter.safetensors holds: every tensor that trains, and every buffer."""
    kept = {name for name, p in model.named_parameters() if p.requires_grad}
    kept |= {name for name, _ in model.named_buffers()}
    return {key: tensor for key, tensor in weights.items() if key in kept}


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """best_adapter.safetensors onto a model that prepare_model built: the same base, with adapters attached.

    Every tensor that trains must be in the file and every key of the file in
    the model; anything else is one line, and the model is left untouched.
    """
    tensors = read_state_dict(path)
    own = model.state_dict()
    needed = [name for name, p in model.named_parameters() if p.requires_grad]
    unknown = [key for key in tensors if key not in own]
    missing = [key for key in needed if key not in tensors]
    wrong = [key for key in tensors if key in own and tensors[key].shape != own[key].shape]
    problems = {"keys this model lacks": unknown, "trainable tensors missing": missing, "shapes differ": wrong}
    for what, keys in problems.items():
        if keys:
            raise CheckpointError(f"{path}: not an adapter of this model: {len(keys)} {what} (first: {keys[0]})")
    model.load_state_dict(tensors, strict=False)
