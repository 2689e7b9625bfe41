"""The layer table: every name a freeze spec can use, and what is frozen now."""

from __future__ import annotations

from collections import Counter
from typing import Any

from peft.tuners.lora import LoraLayer
from torch import nn

from .freeze import BN_POLICY, FreezeState, Selector, resolve
from .lora import describe


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state(module: nn.Module) -> str:
    flags = {p.requires_grad for p in module.parameters()}
    if not flags:
        return "-"
    if isinstance(module, LoraLayer):
        return "lora"  # a frozen base layer with a trainable adapter beside it
    if flags == {True}:
        return "trainable"
    return "frozen" if flags == {False} else "partial"


def layer_table(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Top-level children by index, then every module and parameter by name."""
    return {
        "children": [
            {"index": i, "name": name, "type": type(m).__name__, "params": parameter_count(m), "state": state(m)}
            for i, (name, m) in enumerate(model.named_children())
        ],
        "modules": [
            {"name": name, "type": type(m).__name__, "params": parameter_count(m), "state": state(m)}
            for name, m in model.named_modules()
            if name
        ],
        "parameters": [
            {
                "name": name,
                "type": "x".join(map(str, p.shape)) or "scalar",
                "params": p.numel(),
                "state": "trainable" if p.requires_grad else "frozen",
            }
            for name, p in model.named_parameters()
        ],
    }


def format_rows(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    def cell(row: dict[str, Any], column: str) -> str:
        return f"{row[column]:,}" if column == "params" else str(row[column])

    widths = {c: max([len(c)] + [len(cell(row, c)) for row in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        cells = [cell(row, c).rjust(widths[c]) if c == "params" else cell(row, c).ljust(widths[c]) for c in columns]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_layer_table(table: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["top-level children (freeze by index):"]
    lines += format_rows(table["children"], ["index", "name", "type", "params", "state"])
    lines += ["", "modules (freeze by name):"]
    lines += format_rows(table["modules"], ["name", "type", "params", "state"])
    lines += ["", "parameters (freeze by name or pattern):"]
    lines += format_rows(table["parameters"], ["name", "type", "params", "state"])
    return "\n".join(lines)


def freeze_summary(model: nn.Module, state: FreezeState) -> str:
    """The short report printed when a run starts."""
    table = layer_table(model)
    lines = format_rows(table["children"], ["index", "name", "type", "params", "state"])
    total = parameter_count(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = f"{trainable / total:.1%}"
    modes = Counter(state.bn_modes.values())
    bn = ", ".join(f"{count} {mode}" for mode, count in modes.items()) or "none in the model"
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({share}); BatchNorm ({BN_POLICY}): {bn}")
    lines.append(describe(model))
    return "\n".join(lines)


def spec_report(model: nn.Module, selectors: list[Selector]) -> str:
    """`layers --spec`: what each selector matches, and what the list freezes together."""
    each, combined = resolve(model, selectors, "--spec")
    sizes = dict(model.named_parameters())
    rows = []
    for selector, match in each.items():
        names = match.params
        shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
        params = sum(sizes[n].numel() for n in names)
        rows.append({"selector": selector, "tensors": len(names), "params": params, "matches": shown or "-"})
    lines = format_rows(rows, ["selector", "tensors", "params", "matches"])
    frozen = sum(sizes[n].numel() for n in combined.params)
    total = parameter_count(model)
    lines.append(f"together: {len(combined.params)} tensors, {frozen:,} of {total:,} parameters ({frozen / total:.1%})")
    return "\n".join(lines)


def parse_spec(texts: list[str]) -> list[Selector]:
    """--spec values: comma-separated selectors; a `re:` selector runs to the end of its value."""
    selectors: list[Selector] = []
    for text in texts:
        while text.strip():
            head, _, rest = text.partition(",")
            if head.strip().lstrip("!").startswith("re:"):
                head, rest = text, ""
            selectors.append(head.strip())
            text = rest
    return selectors
