"""Freezing: the selectors, BatchNorm that stays fixed, and an optimizer that holds only what trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import pretrained, tiny_bn_model

from classroom_small_cnn import freeze
from classroom_small_cnn.checkpoint import read_state_dict
from classroom_small_cnn.config import Stage, UserError, load_config
from classroom_small_cnn.model import build_model
from classroom_small_cnn.train import fit

HEAD = "head"


def first_child(model: torch.nn.Module) -> str:
    return next(name for name, child in model.named_children() if any(True for _ in child.parameters()))


@pytest.mark.exercise1
def test_a_name_an_index_and_a_pattern_freeze_the_same_part(config):
    model = build_model(config)
    name = first_child(model)
    index = [n for n, _ in model.named_children()].index(name)
    expected = {n for n, _ in model.named_parameters() if n.startswith(name + ".")}
    for spec in ([name], [index], [f"idx:{index}"], [f"{name}.*"], [f"re:^{name}\\."]):
        assert freeze.select(model, spec, "test") == expected, f"{spec} must freeze every parameter of {name}"


@pytest.mark.exercise1
def test_a_misspelt_name_is_refused_with_the_closest_names(config):
    model = build_model(config)
    name = first_child(model)
    for typo in (name + "x", f"{name}.*x", "re:^" + name + "x"):
        try:
            picked = freeze.select(model, [typo], "freeze.frozen")
        except UserError as err:
            named = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", str(err).replace(typo, ""))
            assert "freeze.frozen" in str(err) and named, f"name the key and the closest names: {err}"
        else:
            raise AssertionError(f"{typo!r} froze {len(picked)} tensors and said nothing: a typo must be refused")
    with pytest.raises(UserError):  # a bad regex is the user's error, not a traceback
        freeze.select(model, ["re:(" + name], "freeze.frozen")


def test_an_index_out_of_range_lists_the_children(config):
    with pytest.raises(UserError, match="picks no child; the model's children are 0="):
        freeze.select(build_model(config), [99], "freeze.frozen")


@pytest.mark.exercise1
def test_a_list_starting_with_negation_freezes_everything_but_the_head(config):
    model = build_model(config)
    frozen = freeze.select(model, [f"!{HEAD}"], "test")
    assert frozen == {n for n, _ in model.named_parameters() if not n.startswith(HEAD + ".")}


def test_freezing_nothing_is_a_full_fine_tune(config):
    config.freeze.frozen = []
    model = build_model(config)
    freeze.apply_freeze(model, config, 0)
    assert all(p.requires_grad for p in model.parameters())


def test_freezing_every_parameter_is_refused(config):
    config.freeze.frozen = ["*"]
    with pytest.raises(UserError, match="nothing would train"):
        freeze.apply_freeze(build_model(config), config, 0)


def by_index(config):
    """Everything but the last child frozen, BatchNorm as usual: selectors and BatchNorm of other exercises unused."""
    config.freeze.frozen, config.freeze.bn_policy = ["idx:0..-1"], "train"
    return config


@pytest.mark.exercise2
def test_the_optimizer_holds_only_what_trains(config):
    model = build_model(by_index(config))
    groups = freeze.param_groups(model, config, 0)
    optimizer = freeze.make_optimizer(model, config, groups)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen_held = len(held - {id(p) for p in model.parameters() if p.requires_grad})
    assert not frozen_held, f"the optimizer holds {frozen_held} frozen tensors: weight decay and Adam would move them"
    assert held == {id(p) for p in model.parameters() if p.requires_grad}, "every trainable tensor must be held"
    assert [group["lr_mult"] for group in optimizer.param_groups] == [1.0]


@pytest.mark.exercise2
def test_an_unfreeze_stage_adds_what_it_releases_to_the_optimizer(config):
    model = build_model(by_index(config))
    first = [n for n, _ in model.named_children()].index(first_child(model))
    config.freeze.stages = [Stage(epoch=1, select=[first], lr_mult=0.1)]
    optimizer = freeze.make_optimizer(model, config, freeze.param_groups(model, config, 0))
    released = freeze.release_stage(model, optimizer, config, 0)
    named = dict(model.named_parameters())
    expected = {n for n in named if n.startswith(first_child(model) + ".")}
    assert set(released or []) == expected and all(named[n].requires_grad for n in expected), "release the stage"
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n in expected if id(named[n]) not in held]
    assert not missing, f"{len(missing)} released tensors are not in the optimizer: they will never train"
    assert optimizer.param_groups[-1]["lr_mult"] == 0.1 and len(optimizer.param_groups) == 2


def test_a_stage_at_epoch_0_trains_its_part_from_the_first_step(config, tmp_path: Path):
    model = build_model(by_index(config))
    name = first_child(model)
    index = [n for n, _ in model.named_children()].index(name)
    config.freeze.stages, config.train.epochs = [Stage(epoch=0, select=[index], lr_mult=0.5)], 1
    fit(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "freeze_manifest.json").read_text())
    assert record["epoch"] == 0 and not [n for n in record["frozen"] if n.startswith(name + ".")]


def test_a_stage_that_releases_nothing_is_refused_before_training(config):
    config.freeze.frozen = [f"!{HEAD}"]
    config.freeze.stages = [Stage(epoch=1, select=[HEAD])]
    with pytest.raises(UserError, match=r"stages\[0\] releases nothing"):
        freeze.param_groups(build_model(config), config, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_frozen_tensors_are_bit_identical_after_training(config, tmp_path: Path, device: str):
    config.freeze.frozen, config.freeze.bn_policy = [f"!{HEAD}"], "eval_frozen"
    before = pretrained(tmp_path / "init.pt", config)
    fit(config, tmp_path / "run", init=str(tmp_path / "init.pt"), device=device)
    after = read_state_dict(tmp_path / "run" / "best.pt")
    frozen = freeze.select(build_model(config), config.freeze.frozen, "test")
    # Every tensor outside the head, BatchNorm statistics included, is the file's.
    assert all(torch.equal(after[n], before[n]) for n in before if not n.startswith(HEAD + "."))
    assert any(not torch.equal(after[n], before[n]) for n in before if n not in frozen)


@pytest.mark.exercise3
@pytest.mark.parametrize("policy", ["eval_frozen", "eval_all", "replace_frozen"])
def test_frozen_batchnorm_statistics_survive_model_train(policy):
    model = tiny_bn_model()
    config = load_config(overrides=["freeze.frozen=[0]", f'freeze.bn_policy="{policy}"'])
    freeze.apply_freeze(model, config, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 3, 8, 8))
    for name in ("0.1.running_mean", "0.1.running_var", "0.1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[name], before[name]), f"{name} moved after model.train(): it must not"
    moved = not torch.equal(model.state_dict()["1.1.running_mean"], before["1.1.running_mean"])
    assert moved == (policy != "eval_all")  # eval_all fixes the statistics of the trained part too


@pytest.mark.exercise3
def test_replace_frozen_computes_what_a_batchnorm_in_eval_mode_computes():
    model, reference = tiny_bn_model(), tiny_bn_model()
    for bn in (model[0][1], reference[0][1]):
        bn.running_mean.copy_(torch.linspace(-1, 1, 4))
        bn.running_var.copy_(torch.linspace(0.5, 2, 4))
    config = load_config(overrides=["freeze.frozen=[0]", 'freeze.bn_policy="replace_frozen"'])
    freeze.apply_freeze(model, config, 0)
    assert isinstance(model[0][1], freeze.FrozenBatchNorm)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(model[0](x), reference.eval()[0](x), atol=1e-6)


def test_bn_modes_name_a_part_and_override_the_policy():
    model = tiny_bn_model()
    modes = ['freeze.bn_policy="eval_frozen"', 'freeze.bn_modes={"1" = "eval"}']
    config = load_config(overrides=["freeze.frozen=[0]", *modes])
    freeze.apply_freeze(model, config, 0)
    assert freeze.mode_of(model[0][1]) == "eval+frozen_affine" and freeze.mode_of(model[1][1]) == "eval"
    assert model[1][1].weight.requires_grad and not model[0][1].weight.requires_grad


def test_a_released_stage_turns_replaced_batchnorm_back_into_batchnorm():
    model = tiny_bn_model()
    config = load_config(overrides=["freeze.frozen=[0]", 'freeze.bn_policy="replace_frozen"'])
    config.freeze.stages = [Stage(epoch=1, select=[0])]
    optimizer = freeze.make_optimizer(model, config, freeze.param_groups(model, config, 0))
    freeze.release_stage(model, optimizer, config, 0)
    assert type(model[0][1]) is torch.nn.BatchNorm2d and model[0][1].weight.requires_grad
