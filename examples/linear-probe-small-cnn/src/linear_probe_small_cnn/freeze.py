r"""The freeze engine: one selector grammar, the freeze state, releasing unfreeze stages (config.py parses them).

A selector picks parameters (and the modules that hold them):

  layer1, layer2.0.conv1.weight   exact module or parameter name, any depth
  features.*, layer[12].*         glob on module and parameter names
  re:^blocks\.[0-5]\.             regex, searched in module and parameter names
  idx:-1, idx:0..7, idx:..-1      top-level children by position; a..b is
  idx:layer4/0..2                 Python's a:b (b left out); PATH/ indexes
                                  the children of module PATH
  param_idx:0..3                  named_parameters() by position
  type:BatchNorm2d, type:*Norm*   modules whose class (or a base) has the name
  !head                           negation: removes what it matches

A list is read in order: a selector adds its matches, a `!` selector removes
them, and a list that starts with `!` starts from every parameter, so
["!head"] is "everything except the head". A selector that matches
nothing is an error that names the closest real names: a typo must never
become a spec that silently freezes nothing.

A frozen parameter has requires_grad=False and no .grad, and never reaches
the optimizer (see optim.py), so weight decay, momentum and Adam state
cannot move it.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .batchnorm import AFFINE_FIXED, BN_MODES, batchnorm_layers, mode_of, set_mode
from .config import Selector, Stage

BN_POLICY = "eval_frozen"


class FreezeSpecError(ValueError):
    pass


@dataclass
class Match:
    """What one selector picked: parameter and module names, in model order."""

    params: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def covers(self, module_name: str, module: nn.Module) -> bool:
        """Whether a module is inside this match: named by it, or all its parameters are."""
        if module_name in self.modules:
            return True
        names = [f"{module_name}.{n}" for n, _ in module.named_parameters()]
        return bool(names) and set(names) <= set(self.params)


def resolve(model: nn.Module, selectors: Sequence[Selector], where: str) -> tuple[dict[str, Match], Match]:
    """Each selector's own match (keyed by its text) and the combined result.

    `where` names the config key in error messages.
    """
    selectors = list(selectors)
    params = [name for name, _ in model.named_parameters()]
    modules = [name for name, _ in model.named_modules() if name]
    chosen_params: set[str] = set(params) if selectors and _negated(selectors[0]) else set()
    chosen_modules: set[str] = set(modules) if selectors and _negated(selectors[0]) else set()
    each = {}
    for selector in selectors:
        text = str(selector)
        negate = _negated(selector)
        match = _match(model, selector if isinstance(selector, int) else text.removeprefix("!"), where)
        each[text] = match
        if negate:
            chosen_params -= set(match.params)
            chosen_modules -= set(match.modules)
        else:
            chosen_params |= set(match.params)
            chosen_modules |= set(match.modules)
    combined = Match([p for p in params if p in chosen_params], [m for m in modules if m in chosen_modules])
    return each, combined


def _negated(selector: Selector) -> bool:
    return isinstance(selector, str) and selector.startswith("!")


def _match(model: nn.Module, selector: Selector, where: str) -> Match:
    if isinstance(selector, bool) or not isinstance(selector, (str, int)):
        raise FreezeSpecError(f"{where}: {selector!r} is not a selector (a string, or an int for a child index)")
    if isinstance(selector, int):
        return _match_index(model, str(selector), where)
    if selector.startswith("idx:"):
        return _match_index(model, selector[4:], where)
    if selector.startswith("param_idx:"):
        return _match_param_index(model, selector[10:], where)
    if selector.startswith("type:"):
        return _match_type(model, selector[5:], where)
    if selector.startswith("re:"):
        try:
            regex = re.compile(selector[3:])
        except re.error as err:
            raise FreezeSpecError(f"{where}: {selector!r} is not a valid regular expression: {err}") from None
        match = _expand(model, lambda name: regex.search(name) is not None)
    elif any(c in selector for c in "*?["):
        match = _expand(model, lambda name: fnmatch.fnmatchcase(name, selector))
    else:
        match = _expand(model, lambda name: name == selector)
    if not match.params and not match.modules:
        body = selector.removeprefix("re:")
        near = _closest(body, _suggestions(model))
        raise FreezeSpecError(f"{where}: {selector!r} matches no module or parameter{near}")
    return match


def _expand(model: nn.Module, hit: Any) -> Match:
    """Modules and parameters whose names `hit`; a hit module brings everything inside it."""
    params, modules = set(), set()
    for name, module in model.named_modules():
        if name and hit(name):
            modules.update(f"{name}.{n}".rstrip(".") for n, _ in module.named_modules())
            params.update(f"{name}.{n}" for n, _ in module.named_parameters())
    params.update(name for name, _ in model.named_parameters() if hit(name))
    return _ordered(model, params, modules)


def _ordered(model: nn.Module, params: set[str], modules: set[str]) -> Match:
    return Match(
        [n for n, _ in model.named_parameters() if n in params],
        [n for n, _ in model.named_modules() if n and n in modules],
    )


def _match_index(model: nn.Module, body: str, where: str) -> Match:
    path, _, span = body.rpartition("/")
    try:
        parent = model.get_submodule(path)
    except AttributeError:
        modules = [name for name, _ in model.named_modules() if name]
        raise FreezeSpecError(f"{where}: idx:{body}: {path!r} is not a module{_closest(path, modules)}") from None
    children = [f"{path}.{name}" if path else name for name, _ in parent.named_children()]
    picked = _positions(children, span, f"idx:{body}", where, "children of " + (path or "the model"))
    return _expand(model, lambda name: name in picked)


def _match_param_index(model: nn.Module, span: str, where: str) -> Match:
    params = [name for name, _ in model.named_parameters()]
    picked = set(_positions(params, span, f"param_idx:{span}", where, "parameter tensors"))
    return _ordered(model, picked, set())


def _positions(items: list[str], span: str, selector: str, where: str, what: str) -> list[str]:
    """`N` one item (negative counts from the end); `a..b`, `a..`, `..b` Python's a:b slices."""
    n = len(items)
    listing = ", ".join(f"{i}={name}" for i, name in enumerate(items[:40])) + (", ..." if n > 40 else "")
    try:
        if ".." in span:
            start, stop = (int(x) if x.strip() else None for x in span.split(".."))
        else:
            start, stop = int(span), None
    except ValueError:
        raise FreezeSpecError(f"{where}: {selector!r}: write N, a..b, a.. or ..b with integers") from None
    for end in (start, stop):
        if end is not None and not -n <= end <= (n if ".." in span else n - 1):
            raise FreezeSpecError(f"{where}: {selector!r} is out of range; there are {n} {what}: {listing}")
    picked = items[start:stop] if ".." in span else [items[start]]
    if not picked:
        raise FreezeSpecError(f"{where}: {selector!r} is an empty range of the {n} {what}: {listing}")
    return picked


def _match_type(model: nn.Module, pattern: str, where: str) -> Match:
    def hit(module: nn.Module) -> bool:
        # The whole class line, so type:BatchNorm2d still matches a layer whose mode changed its class.
        return any(fnmatch.fnmatchcase(cls.__name__, pattern) for cls in type(module).__mro__)

    names = {name for name, module in model.named_modules() if name and hit(module)}
    if not names:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise FreezeSpecError(f"{where}: 'type:{pattern}' matches no module{_closest(pattern, present)}")
    return _expand(model, lambda name: name in names)


def _suggestions(model: nn.Module) -> list[str]:
    modules = [name for name, _ in model.named_modules() if name]
    return modules + [f"{name}.*" for name in modules] + [name for name, _ in model.named_parameters()]


def _closest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""


# ---------------------------------------------------------------------------
# The freeze state: which parameters are frozen and each BatchNorm's mode.
# ---------------------------------------------------------------------------


@dataclass
class FreezeState:
    """Everything a run needs to put the same freeze back on a fresh model.

    `frozen` is what the spec and the stages so far leave frozen; BatchNorm
    layers in AFFINE_FIXED modes keep their weight and bias frozen on top.
    """

    frozen: set[str]
    bn_modes: dict[str, str]
    selectors: dict[str, list[str]] = field(default_factory=dict)
    stages_done: int = 0
    stage_epochs: list[int] = field(default_factory=list)  # the epoch each stage done started at


def freeze(model: nn.Module, spec: Sequence[Selector], bn_overrides: dict[str, str], where: str) -> FreezeState:
    """Apply a freeze spec and the BatchNorm modes; raise before touching the model when either is wrong."""
    each, combined = resolve(model, spec, where)
    frozen = set(combined.params)
    total = sum(1 for _ in model.parameters())
    if spec and not frozen:
        raise FreezeSpecError(f"{where}: the spec selects no parameter ({', '.join(each)} hold none together)")
    if len(frozen) == total:
        raise FreezeSpecError(
            f"{where}: the spec freezes every parameter, so nothing would train; leave at least the head out of it"
        )
    state = FreezeState(frozen, bn_modes(model, frozen, bn_overrides), {s: m.params for s, m in each.items()})
    apply(model, state)
    return state


def bn_modes(model: nn.Module, frozen: set[str], overrides: dict[str, str]) -> dict[str, str]:
    """Each BatchNorm layer's mode: bn_policy by frozen part, then freeze.bn_modes in order."""
    layers = batchnorm_layers(model)
    modes = {}
    for name, module in layers.items():
        inside = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if not inside:  # no affine: the layer goes with the part around it
            parent = name.rpartition(".")[0]
            inside = [f"{parent}.{n}".lstrip(".") for n, _ in model.get_submodule(parent).named_parameters()]
        in_frozen = any(n in frozen for n in inside)
        modes[name] = "eval+frozen_affine" if in_frozen else "train"
    for selector, mode in overrides.items():
        if mode not in BN_MODES:
            raise FreezeSpecError(f"freeze.bn_modes: {selector!r} = {mode!r}; a mode is one of {', '.join(BN_MODES)}")
        _, match = resolve(model, [selector], f"freeze.bn_modes {selector!r}")
        hits = [name for name, module in layers.items() if match.covers(name, module)]
        if not hits:
            raise FreezeSpecError(f"freeze.bn_modes: {selector!r} holds no BatchNorm layer")
        modes.update(dict.fromkeys(hits, mode))
    return modes


def apply(model: nn.Module, state: FreezeState) -> None:
    """Put the model in `state`: BatchNorm modes first, then requires_grad (and .grad = None) everywhere."""
    for name, mode in state.bn_modes.items():
        try:
            set_mode(model, name, mode)
        except (AttributeError, ValueError) as err:
            raise FreezeSpecError(f"BatchNorm mode {mode!r} for {name!r}: {err}") from None
    fixed_affine = {
        f"{name}.{n}"
        for name, mode in state.bn_modes.items()
        if mode in AFFINE_FIXED
        for n, _ in model.get_submodule(name).named_parameters()
    }
    for name, param in model.named_parameters():
        trainable = name not in state.frozen and name not in fixed_affine
        param.requires_grad_(trainable)
        if not trainable:
            # A stale gradient must not linger on a frozen tensor (an optimizer would still see it).
            param.grad = None


# ---------------------------------------------------------------------------
# Unfreeze stages
# ---------------------------------------------------------------------------


def check_stages(model: nn.Module, stages: list[Stage]) -> None:
    """Resolve every stage's selection now, so a typo fails before epoch 0, not at epoch 7."""
    for i, stage in enumerate(stages):
        resolve(model, stage.select, f"unfreeze.stages[{i}].select")


def unfreeze_stage(
    model: nn.Module, state: FreezeState, stage: Stage, bn_overrides: dict[str, str], epoch: int
) -> list[str]:
    """Make the stage's selection trainable at `epoch`, re-derive BatchNorm modes; return the names that now train."""
    before = {name for name, p in model.named_parameters() if p.requires_grad}
    _, match = resolve(model, stage.select, f"unfreeze.stages[{state.stages_done}].select")
    state.frozen -= set(match.params)
    state.bn_modes = bn_modes(model, state.frozen, bn_overrides)
    state.stages_done += 1
    state.stage_epochs.append(epoch)
    apply(model, state)
    return [name for name, p in model.named_parameters() if p.requires_grad and name not in before]


# ---------------------------------------------------------------------------
# freeze_manifest.json
# ---------------------------------------------------------------------------


def manifest(model: nn.Module, state: FreezeState, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The freeze state as JSON: enough for --freeze-from and --resume to rebuild it exactly."""
    params = list(model.named_parameters())
    return {
        "frozen": [name for name, p in params if not p.requires_grad],
        "trainable": [name for name, p in params if p.requires_grad],
        "bn_fixed": [name for name, m in batchnorm_layers(model).items() if mode_of(m) != "train"],
        "bn_policy": BN_POLICY,
        "bn_modes": state.bn_modes,
        "requires_grad": {name: p.requires_grad for name, p in params},
        "selectors": {selector: len(names) for selector, names in state.selectors.items()},
        "resolved": state.selectors,
        "spec_frozen": sorted(state.frozen),
        "stages_done": state.stages_done,
        "stage_epochs": state.stage_epochs,
        "param_groups": groups,
    }


def state_from_manifest(model: nn.Module, data: dict[str, Any], source: str) -> FreezeState:
    """A FreezeState read back from a manifest, checked against this model's names."""
    try:
        frozen, modes = set(data["spec_frozen"]), dict(data["bn_modes"])
        stages_done, selectors = int(data["stages_done"]), dict(data["resolved"])
        # Manifests written before plateau stages do not hold the epochs.
        stage_epochs = [int(epoch) for epoch in data.get("stage_epochs", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise FreezeSpecError(f"{source} is not a freeze manifest this project wrote (missing {err})") from None
    params = [name for name, _ in model.named_parameters()]
    unknown = sorted(frozen - set(params))
    if unknown:
        name = unknown[0]
        raise FreezeSpecError(f"{source}: {name!r} is not a parameter of the model{_closest(name, params)}")
    layers = list(batchnorm_layers(model))
    for name, mode in modes.items():
        if name not in layers:
            raise FreezeSpecError(f"{source}: {name!r} is not a BatchNorm layer of the model{_closest(name, layers)}")
        if mode not in BN_MODES:
            raise FreezeSpecError(f"{source}: {name!r} has mode {mode!r}; a mode is one of {', '.join(BN_MODES)}")
    return FreezeState(frozen, modes, selectors, stages_done, stage_epochs)
