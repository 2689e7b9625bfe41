"""Which parameters are frozen, chosen by backbone.

A frozen parameter has requires_grad=False and never reaches the optimizer
(see train.py), so weight decay, momentum and Adam state cannot move it.
Every selector must select something: a typo is an error that names the
closest real names, never a spec that silently freezes nothing.
"""

from __future__ import annotations

import difflib

from torch import nn


class FreezeSpecError(ValueError):
    pass


def select_frozen(model: nn.Module, keep_trainable: list[str]) -> dict[str, list[str]]:
    """Freeze every parameter outside the modules named in `keep_trainable`."""
    params = [name for name, _ in model.named_parameters()]
    known = _module_and_parameter_names(model)
    for name in keep_trainable:
        if name not in known:
            near = _closest(name, known)
            raise FreezeSpecError(f"freeze.keep_trainable: {name!r} is not a module or parameter of the model{near}")
    frozen = [p for p in params if not any(_inside(p, keep) for keep in keep_trainable)]
    return {"all but " + ", ".join(keep_trainable): frozen}


def freeze(model: nn.Module, spec: list[str]) -> dict[str, list[str]]:
    """Apply the spec: selected parameters frozen, all others trainable.

    Raises FreezeSpecError before touching the model when the spec is wrong.
    """
    selection = select_frozen(model, spec)
    frozen = {name for names in selection.values() for name in names}
    if not frozen:
        empty = ", ".join(selection)
        raise FreezeSpecError(f"the freeze spec selects no parameter ({empty} hold none)")
    params = dict(model.named_parameters())
    if len(frozen) == len(params):
        message = "the freeze spec freezes every parameter, so nothing would train; leave at least the head out of it"
        raise FreezeSpecError(message)
    for name, param in params.items():
        param.requires_grad_(name not in frozen)
        if name in frozen:
            # A stale gradient from an earlier step must not linger on a frozen tensor.
            param.grad = None
    return selection


def _inside(param_name: str, module_or_param: str) -> bool:
    return param_name == module_or_param or param_name.startswith(module_or_param + ".")


def _module_and_parameter_names(model: nn.Module) -> list[str]:
    modules = [name for name, _ in model.named_modules() if name]
    return modules + [name for name, _ in model.named_parameters()]


def _closest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""
