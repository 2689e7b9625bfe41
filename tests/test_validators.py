"""Bad answers are refused at render time with a message that says what is wrong."""

from __future__ import annotations

import pytest


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
