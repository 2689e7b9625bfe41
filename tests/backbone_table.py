"""docs/backbones.md's backbone table, computed from fresh renders: `python -m tests.backbone_table`.

Each backbone is rendered with freeze_by=name (num_classes 10) and its model
built on the meta device, so the counts are the generated code's own. A test
checks that docs/backbones.md holds exactly this table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from scaffold.matrix import DIMENSIONS
from scaffold.render import render
from tests.conftest import ROOT, import_rendered

BEGIN, END = "<!-- backbone-table:begin -->", "<!-- backbone-table:end -->"


def row(backbone: str, workdir: Path) -> str:
    package = f"table_{backbone}"
    # Default answers throughout: timm's default model, custom's shipped character model.
    data = {"project_name": package, "backbone": backbone, "freeze_by": "name"}
    project = render(workdir / package, data, src=ROOT)
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]  # an earlier table's render, now deleted
    config = import_rendered(project, package, "config").load_config()
    model_module = import_rendered(project, package, "model")
    freeze = import_rendered(project, package, "freeze")
    with torch.device("meta"):
        model = model_module.build_model(config)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(sizes.values())
    head = sum(n for name, n in sizes.items() if name.startswith(model_module.HEAD + "."))
    names = config.freeze.names
    _, match = freeze.resolve(model, names, "names")
    frozen = sum(sizes[name] for name in match.params)
    label = f"timm `{model_module.ARCH}`" if backbone == "timm" else f"`{backbone}`"
    spec = ", ".join(f"`{n}`" for n in names)
    return (
        f"| {label} | `{model_module.HEAD}` | {total:,} | {total - head:,} / {head:,} "
        f"| {spec} | {frozen:,} / {total - frozen:,} |"
    )


def table() -> str:
    lines = [
        "| backbone | head | parameters | backbone mode: frozen / trainable | freeze_by=name default "
        "| frozen / trainable |",
        "|---|---|---:|---:|---|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        lines += [row(backbone, Path(tmp)) for backbone in DIMENSIONS["backbone"]]
    return "\n".join(lines)


def readme_table(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    readme = ROOT / "docs" / "backbones.md"
    before, rest = readme.read_text().split(BEGIN, 1)
    fresh = table()
    readme.write_text(f"{before}{BEGIN}\n{fresh}\n{END}{rest.split(END, 1)[1]}")
    print(fresh)
