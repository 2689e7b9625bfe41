"""The freeze spec (pattern) freezes what it says, and a wrong spec stops everything."""

from __future__ import annotations

import pytest
import torch
from conftest import to_toml

from resnet18_pattern.cli import main
from resnet18_pattern.freeze import FreezeSpecError, freeze
from resnet18_pattern.model import HEAD, build_model
from resnet18_pattern.train import make_optimizer, prepare_model


def test_default_spec_freezes_part_and_leaves_the_head_trainable(config):
    model, manifest = prepare_model(config)
    assert manifest["frozen"], "the default spec froze nothing"
    head = [n for n, _ in model.get_submodule(HEAD).named_parameters()]
    assert head and all(f"{HEAD}.{n}" in manifest["trainable"] for n in head)
    for selector, count in manifest["selectors"].items():
        assert count > 0, f"{selector} selected nothing"


def test_optimizer_holds_trainable_parameters_only(config):
    model, _ = prepare_model(config)
    optimizer = make_optimizer(model, config)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_drops_stale_gradients(config):
    model = build_model(config["model"]["num_classes"])
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    freeze(model, config["freeze"]["patterns"])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def misspelled(config) -> str:
    good = config["freeze"]["patterns"][0]
    return good[1] + good[0] + good[2:]  # the classic transposition typo


def test_misspelled_selector_is_an_error_naming_the_closest(config):
    model = build_model(config["model"]["num_classes"])
    typo = misspelled(config)
    with pytest.raises(FreezeSpecError, match="closest") as err:
        freeze(model, [typo])
    assert repr(typo) in str(err.value)


def test_bad_spec_exits_nonzero_and_writes_no_run_folder(tmp_path, config, capsys):
    bad = dict(config)
    bad["freeze"] = {**config["freeze"], "patterns": [misspelled(config)]}
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(bad))
    out = tmp_path / "run"
    assert main(["--config", str(path), "train", "--out", str(out)]) == 2
    assert not out.exists()
    assert "error: freeze.patterns" in capsys.readouterr().err


def test_a_spec_that_freezes_everything_is_refused(config):
    model = build_model(config["model"]["num_classes"])
    everything = [name for name, _ in model.named_parameters()]
    with pytest.raises(FreezeSpecError, match="nothing would train"):
        freeze(model, ["*"])
    assert everything
