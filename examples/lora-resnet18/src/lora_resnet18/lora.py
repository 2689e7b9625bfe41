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
                              statistics, which peft's own save leaves out),
                              with the SHA-256 of the base it was trained on:
                              on any other base it would load without a word
                              and compute something else.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save
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


def merges_exactly(module: nn.Module) -> bool:
    """Whether peft's layer computes what `module` does, and merges back into its weight exactly.

    Not: a subclass with its own forward (timm's StdConv2d standardises its
    weight), a grouped (depthwise), dilated or non-zero-padded conv (peft's
    A conv copies neither), or an Embedding that renormalises (max_norm).
    """
    stock = type(module).forward in {kind.forward for kind in ADAPTABLE}
    plain_conv = getattr(module, "groups", 1) == 1 and set(getattr(module, "dilation", (1,))) == {1}
    zero_padded = getattr(module, "padding_mode", "zeros") == "zeros"
    return stock and plain_conv and zero_padded and getattr(module, "max_norm", None) is None


def targets(model: nn.Module, selectors: list[Selector]) -> list[str]:
    """The modules of the selection that get adapters, in model order.

    A selection names a region; inside it, every Linear, Conv1d, Conv2d and
    Embedding that merges_exactly() is adapted, except the out_proj of
    nn.MultiheadAttention, whose forward reads its weight without calling it.
    A selector that adds no such module is an error, not a silent no-op.
    """
    each, match = resolve(model, selectors, "lora.target")
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
        if name not in in_attention and merges_exactly(module):
            chosen.append(name)
    for text, selected in each.items():
        if not text.startswith("!") and not any(selected.covers(n, model.get_submodule(n)) for n in chosen):
            raise FreezeSpecError(
                f"lora.target: {text!r} holds no Linear, Conv or Embedding that LoRA can adapt and merge "
                "(grouped, dilated or padded-mode convs, custom forwards and nn.MultiheadAttention are left out)"
            )
    return chosen


def check_called(model: nn.Module, names: list[str], inputs: torch.Tensor) -> None:
    """One forward in eval mode: an adapter whose module the forward never calls would never train."""
    called: set[str] = set()
    hooks = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: called.add(n)) for n in names]
    training = model.training
    model.eval()  # no BatchNorm statistics move, no dropout draws
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    never = [n for n in names if n not in called]
    if never:
        raise FreezeSpecError(
            f"lora.target: {never[0]} (of {len(never)} such) never runs in the model's forward (its parent reads "
            "the weight directly), so its adapter would never train; take it out of the target"
        )


def attach(model: nn.Module, config: LoraConfig, inputs: torch.Tensor | None = None) -> list[str]:
    """Put an adapter on each target; the base weights stay as they are (B starts at zero).

    With `inputs`, one forward checks that every adapter runs. An empty
    target attaches nothing: only keep_trainable trains, a linear probe.
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
    if inputs is not None:
        check_called(model, names, inputs)
    return names


def adapted(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def describe(model: nn.Module) -> str:
    """One line for the freeze summary: where the adapters sit."""
    names = adapted(model)
    if not names:
        return "LoRA: no adapters (lora.target = []): only keep_trainable trains"
    shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
    rank, alpha = rank_alpha(model, names)
    return f"LoRA (rank {rank}, scale alpha/rank = {alpha / rank:g}) on {len(names)} modules: {shown}"


def rank_alpha(model: nn.Module, names: list[str]) -> tuple[int, float]:
    """The rank and alpha of the adapters on `names`: attach gives every one the same."""
    layer = model.get_submodule(names[0])
    return layer.r["default"], layer.lora_alpha["default"]


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


def scale_metadata(model: nn.Module) -> dict[str, str]:
    """rank and alpha, which the adapter file must be read back with (safetensors metadata is str -> str)."""
    names = adapted(model)
    if not names:
        return {}
    rank, alpha = rank_alpha(model, names)
    return {"lora_rank": str(rank), "lora_alpha": str(alpha)}


def adapter_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What best_adapter.safetensors holds: every tensor that trains, and every buffer."""
    kept = {name for name, p in model.named_parameters() if p.requires_grad}
    kept |= {name for name, _ in model.named_buffers()}
    return {key: tensor for key, tensor in weights.items() if key in kept}


def base_sha256(weights: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of the tensors of `weights` that the adapter file leaves out: the base it goes back onto."""
    digest = hashlib.sha256()
    for name in sorted(set(weights) - set(adapter)):
        # One tensor at a time, name, dtype and shape included, so no second copy of the model is held.
        digest.update(save({name: weights[name].detach().cpu().contiguous()}))
    return digest.hexdigest()


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """best_adapter.safetensors onto a model that prepare_model built: the same base, with adapters attached.

    Every tensor that trains must be in the file, every key of the file in
    the model, and the rest of the model must be the base the file records;
    anything else is one line, and the model is left untouched. (A file
    written before adapter files recorded their base is loaded without that
    last check.)
    """
    with safe_open(str(path), "pt") as file:
        saved = file.metadata() or {}
    for key, value in scale_metadata(model).items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"{path}: trained with {key} = {saved[key]}, this model has {value}; build it from the run's config"
            )
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
    recorded = saved.get("lora_base_sha256")
    if recorded is not None and recorded != (actual := base_sha256(own, tensors)):
        raise CheckpointError(
            f"{path}: trained on another base (SHA-256 {recorded[:12]}..., this model's is {actual[:12]}...); "
            "build the model as the run did: its config.toml, its --init file, its train.seed"
        )
    model.load_state_dict(tensors, strict=False)


def merged_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A LoRA run's last.ckpt weights, merged as best.* is: `model` is one that prepare_model built."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError:
        raise CheckpointError(
            f"{source}: not this project's adapted model (a [lora] target or rank other than the run's? "
            "pass --config RUN/config.toml, or the run's best.*)"
        ) from None
    return merged_state_dict(model)
