"""Which parameters are frozen, chosen by pattern.

A frozen parameter has requires_grad=False and never reaches the optimizer
(see train.py), so weight decay, momentum and Adam state cannot move it.
Every selector must select something: a typo is an error that names the
closest real names, never a spec that silently freezes nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
import re

from torch import nn


class FreezeSpecError(ValueError):
    pass


def select_frozen(model: nn.Module, patterns: list[str]) -> dict[str, list[str]]:
    """Map each glob (or `re:` regex) to the parameter names it matches."""
    params = [name for name, _ in model.named_parameters()]
    # Suggestions are module-level globs, the form a pattern usually takes.
    suggestions = [f"{name}.*" for name, _ in model.named_modules() if name] + params
    selection = {}
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as err:
                raise FreezeSpecError(
                    f"freeze.patterns: {pattern!r} is not a valid regular expression: {err}"
                ) from None
            matched = [p for p in params if regex.search(p)]
        else:
            matched = [p for p in params if fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            body = pattern.removeprefix("re:")
            raise FreezeSpecError(f"freeze.patterns: {pattern!r} matches no parameter{_closest(body, suggestions)}")
        selection[pattern] = matched
    return selection


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
