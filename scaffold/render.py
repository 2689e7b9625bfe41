"""Rendering the template through Copier's Python API."""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import copier
import yaml

# Answers whose values are YAML lists or numbers when given as `key=value` text.
YAML_ANSWERS = {
    "freeze_names",
    "freeze_indices",
    "freeze_patterns",
    "checkpoint_formats",
    "features",
    "num_classes",
    "unfreeze_at_epoch",
}


def template_root() -> Path:
    """The template: bundled in an installed wheel, or this checkout's root."""
    here = Path(__file__).resolve().parent
    bundled = here / "_template"
    if (bundled / "copier.yml").is_file():
        return bundled
    checkout = here.parent
    if (checkout / "copier.yml").is_file():
        return checkout
    raise FileNotFoundError(f"no copier.yml bundled in {bundled} or next to {here}")


def parse_data(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line into typed answers."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--data {pair!r}: expected key=value")
        data[key] = yaml.safe_load(value) if key in YAML_ANSWERS else value
    return data


def backbone_answers(backbone: str) -> dict[str, Any]:
    """`layers` arguments as answers: a backbone value, `timm:<model>`, or `module:factory`."""
    if backbone.startswith("timm:"):
        return {"backbone": "timm", "timm_model": backbone.removeprefix("timm:")}
    if ":" in backbone:
        return {"backbone": "custom", "custom_model": backbone, "custom_data": "", "custom_head": last_layer(backbone)}
    return {"backbone": backbone}


def last_layer(factory: str) -> str:
    """The last module with parameters of factory(2)'s model: where a classifier usually sits."""
    module_name, _, attr = factory.partition(":")
    sys.path.insert(0, os.getcwd())  # where a user's own module usually sits
    try:
        model = getattr(importlib.import_module(module_name), attr)(2)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{factory}: cannot build the model ({err})") from None
    finally:
        sys.path.remove(os.getcwd())
    names = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    if not names:
        raise ValueError(f"{factory}: the model has no parameters")
    return names[-1]


def complete_answers(data: dict[str, Any]) -> dict[str, Any]:
    """Check a timm model name against the installed timm and fill in its classifier.

    copier.yml can only check the spelling of a name (its validators run no
    Python); here, where timm is importable, the name is checked against
    timm.list_models() and timm_head is read from the model's pretrained_cfg.
    """
    if data.get("backbone") != "timm" or "timm_model" not in data:
        return data
    try:
        import timm
    except ImportError:
        return data  # the generated project checks the name at start
    name = data["timm_model"]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.partition(".")[0], timm.list_models(), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"timm_model {name!r} is not in timm {timm.__version__}'s list_models(){hint}")
    return {"timm_head": timm.get_pretrained_cfg(name).classifier, **data}


def render(dest: str | Path, data: dict[str, Any], *, src: str | Path | None = None, quiet: bool = True) -> Path:
    """Render non-interactively: answers from `data`, defaults for the rest."""
    dest = Path(dest)
    with warnings.catch_warnings():
        # A checkout with uncommitted edits renders those edits; that is the point.
        warnings.simplefilter("ignore", copier.errors.DirtyLocalWarning)
        copier.run_copy(
            str(src or template_root()),
            dest,
            data=data,
            defaults=True,
            quiet=quiet,
            vcs_ref="HEAD",
            unsafe=False,
        )
    return dest


@functools.cache
def backbone_facts(backbone: str) -> dict[str, Any]:
    """copier.yml's `bb` table for one backbone (its defaults for the rest), as Copier computes it.

    The one source of backbone facts (head, BatchNorm, default selections):
    the scaffold reads them here instead of keeping a copy.
    """
    with tempfile.TemporaryDirectory() as dest, warnings.catch_warnings():
        warnings.simplefilter("ignore", copier.errors.DirtyLocalWarning)
        answers = {"backbone": backbone}
        worker = copier.run_copy(
            str(template_root()), dest, data=answers, defaults=True, quiet=True, pretend=True, vcs_ref="HEAD"
        )
    return dict(worker.answers.combined["bb"])


def package_name(project: Path) -> str:
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    return answers["package_name"]
