"""Rendering the template through Copier's Python API."""

from __future__ import annotations

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


def package_name(project: Path) -> str:
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    return answers["package_name"]
