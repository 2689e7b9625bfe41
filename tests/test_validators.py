"""Bad answers are refused at render time with a message that says what is wrong."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_classes": 1}, "num_classes must be at least 2, got 1"),
        ({"package_name": "class"}, "'class' is a Python keyword"),
        ({"package_name": "9lives"}, "is not a valid Python identifier"),
        ({"package_name": "torch"}, "would shadow the module"),
        ({"project_name": "-x"}, "must start with a letter"),
        ({"freeze_by": "name", "freeze_names": []}, "freeze_names must be a non-empty YAML list"),
        ({"freeze_by": "name", "freeze_names": ["layer*"]}, "'layer*' is not a qualified module or parameter name"),
        ({"freeze_by": "index", "freeze_indices": ["x"]}, "freeze_indices: 'x' is not an integer"),
        ({"freeze_by": "index", "freeze_indices": [1.5]}, "'1.5' is not an integer"),
        ({"freeze_by": "index", "freeze_indices": [7]}, "7 is out of range; small_cnn has 5 top-level children"),
        ({"freeze_by": "pattern", "freeze_patterns": []}, "freeze_patterns must be a non-empty YAML list"),
        (
            {"freeze_by": "pattern", "freeze_patterns": ["re:layer[12"]},
            "'re:layer[12' is not a valid regular expression",
        ),
        ({"freeze_by": "pattern", "freeze_patterns": ["re:(stem"]}, "'re:(stem' is not a valid regular expression"),
        ({"freeze_by": "pattern", "freeze_patterns": ["re:a{2,1}"]}, "min repeat greater than max repeat"),
        ({"freeze_by": "none", "bn_policy": "eval_frozen"}, "freeze_by is 'none' so nothing is frozen"),
        ({"checkpoint_formats": []}, "choose at least one format"),
        ({"unfreeze_at_epoch": -1}, "unfreeze_at_epoch must be 0 (never) or a positive epoch"),
        ({"gpu_runner_label": "gpu runner"}, "must be a single runner label"),
        ({"backbone": "resnet1"}, "Invalid choice for 'backbone'"),
        ({"profile": "teaching", "freeze_by": "lora"}, "freeze_by 'lora' is in the research edition only"),
        ({"profile": "teaching", "features": ["traps", "amp"]}, "the teaching edition takes only traps, not amp"),
    ],
)
def test_bad_answer_is_refused_with_its_message(render_project, tmp_path, data, message):
    with pytest.raises(ValueError, match="Validation error|Invalid choice") as err:
        render_project(**data)
    assert message in " ".join(str(err.value).split())
    assert not (tmp_path / "proj" / "pyproject.toml").exists()


def test_defaults_follow_the_backbone(render_project):
    project = render_project(backbone="resnet18", freeze_by="index")
    config = (project / "src/finetune_demo/config.toml").read_text()
    assert "indices = [0, 1, 2, 3, 4, 5]" in config
    assert "pretrained = true" in config


# `import x` and `from x.y import z` at the start of a line: the module a render imports.
IMPORT = r"^\s*(?:from\s+([A-Za-z_]\w*)[\w.]*\s+import\b|import\s+([A-Za-z_]\w*))"


def shadowed_names() -> set[str]:
    """The one list of module names package_name may not take, read from copier.yml's validator."""
    validator = yaml.safe_load((ROOT / "copier.yml").read_text())["package_name"]["validator"]
    listed = re.search(r"package_name in \[([^\]]*)\] %\}\s*package_name '[^']*' would shadow", validator)
    return set(re.findall(r"'(\w+)'", listed.group(1)))


def top_level_modules(distribution: str) -> set[str]:
    """The importable names an installed distribution puts in site-packages (none when it is not installed)."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return set()
    names = {Path(f.parts[0]).stem if f.parts[0].endswith(".py") else f.parts[0] for f in files}
    return {name for name in names if name.isidentifier() and not name.startswith("_")}


def test_package_name_refuses_every_module_a_render_imports_or_depends_on():
    names = shadowed_names()
    imported = set()
    for base in ("template", "teaching"):
        for path in (ROOT / base).rglob("*.jinja"):
            found = re.findall(IMPORT, path.read_text(), re.M)
            imported |= {a or b for a, b in found if not (a or b).startswith("test_")} - {"__future__"}
    assert not imported - names, f"copier.yml's package_name list lacks {sorted(imported - names)}"
    required = set()
    for distribution in ("torch", "torchvision", "timm", "peft", "safetensors", "tqdm", "tomli-w"):
        required |= top_level_modules(distribution)
        for requirement in metadata.requires(distribution) or []:
            if "extra ==" not in requirement:
                required |= top_level_modules(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    assert not required - names, f"copier.yml's package_name list lacks {sorted(required - names)}"


@pytest.mark.parametrize("name", ["tqdm", "numpy", "tomli_w", "peft", "onnx", "matplotlib", "pathlib"])
def test_a_package_name_that_shadows_a_dependency_is_refused(render_project, tmp_path, name):
    with pytest.raises(ValueError, match="Validation error") as err:
        render_project(package_name=name)
    assert f"package_name '{name}' would shadow the module of the same name" in " ".join(str(err.value).split())
