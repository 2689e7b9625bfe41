"""The selector grammar selects what it says, and a wrong selector stops everything."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import frozen_names, has_params, to_toml

from linear_probe_small_cnn.cli import main
from linear_probe_small_cnn.data import example_inputs
from linear_probe_small_cnn.freeze import FreezeSpecError, freeze, resolve
from linear_probe_small_cnn.model import HEAD, build_model
from linear_probe_small_cnn.optim import make_optimizer
from linear_probe_small_cnn.run import freeze_spec, prepare_model


@pytest.fixture
def model(config):
    return build_model(config)


def picked(model, *selectors):
    return resolve(model, list(selectors), "test")[1].params


def inside(model, module):
    return [f"{module}.{n}" for n, _ in model.get_submodule(module).named_parameters()]


def test_default_spec_freezes_what_the_config_says(config):
    model, state = prepare_model(config)
    assert frozen_names(model), "the default spec froze nothing"
    head = inside(model, HEAD)
    assert head and not set(head) & set(frozen_names(model)), "the head must train"
    for selector, names in state.selectors.items():
        assert names, f"{selector} selected nothing"


def test_optimizer_holds_trainable_parameters_only(config):
    model, _ = prepare_model(config)
    optimizer = make_optimizer(model, config)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_drops_stale_gradients(model, config):
    model(example_inputs(config, 2)).sum().backward()
    freeze(model, ["!" + HEAD], {}, "test")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_names_globs_and_regexes_select_the_same_module(model):
    first = next(name for name, child in model.named_children() if has_params(child))
    expected = inside(model, first)
    assert picked(model, first) == expected
    assert picked(model, f"{first}.*") == expected
    assert picked(model, rf"re:^{first}\.") == expected
    one = expected[0]
    assert picked(model, one) == [one], "a parameter name selects that one tensor"


def test_child_indices_negative_ranges_open_ranges_and_nested(model):
    children = [name for name, _ in model.named_children()]
    assert picked(model, "idx:-1") == inside(model, children[-1])
    assert picked(model, -1) == inside(model, children[-1]), "an int is a child index"
    # Parameters sitting on the model itself (a ViT's cls_token) belong to no child.
    assert picked(model, "idx:..-1") == [p for c in children[:-1] for p in inside(model, c)]
    assert picked(model, "idx:0..2") == inside(model, children[0]) + inside(model, children[1])
    assert picked(model, "idx:1..") == [p for c in children[1:] for p in inside(model, c)]
    # Nested: the children of the first child that has parameterised children.
    parent = next(n for n, m in model.named_modules() if n and sum(1 for c in m.children() if has_params(c)) > 1)
    sub = [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_children()]
    assert picked(model, f"idx:{parent}/0..1") == inside(model, sub[0])


def test_parameter_indices_follow_named_parameters_order(model):
    params = [name for name, _ in model.named_parameters()]
    assert picked(model, "param_idx:0..3") == params[:3]
    assert picked(model, "param_idx:-1") == params[-1:]


def test_type_selects_every_module_of_a_class(model):
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert layers, "the backbone has BatchNorm2d layers"
    assert picked(model, "type:BatchNorm2d") == [p for n in layers for p in inside(model, n)]
    assert set(inside(model, HEAD)) <= set(picked(model, "type:Linear"))


def test_negation_reads_in_order(model):
    params = [name for name, _ in model.named_parameters()]
    everything_but_head = [p for p in params if p not in inside(model, HEAD)]
    assert picked(model, "!" + HEAD) == everything_but_head, "a leading ! starts from every parameter"
    first = everything_but_head[0]
    assert picked(model, "!" + HEAD, "!" + first) == everything_but_head[1:]
    assert picked(model, "!" + first, first) == params, "a later selector adds back"


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("ehad", r"matches no module or parameter; closest: head"),
        ("idx:99", r"out of range; there are \d+ children of the model: 0="),
        ("idx:nosuch/0", r"'nosuch' is not a module"),
        ("idx:a..b", r"write N, a\.\.b"),
        ("param_idx:100000", r"out of range; there are \d+ parameter tensors"),
        ("type:Batchnorm2d", r"matches no module; closest: BatchNorm2d"),
        ("re:(unclosed", r"not a valid regular expression"),
        ("head.*.nothing", r"matches no module or parameter"),
    ],
)
def test_a_selector_that_matches_nothing_is_an_error(model, selector, message):
    with pytest.raises(FreezeSpecError, match=message):
        freeze(model, [selector], {}, "freeze.keep_trainable")
    assert all(p.requires_grad for p in model.parameters()), "an error leaves the model untouched"


def test_a_spec_that_freezes_everything_is_refused(model):
    with pytest.raises(FreezeSpecError, match="nothing would train"):
        freeze(model, ["*"], {}, "test")


def test_bad_spec_exits_nonzero_and_writes_no_run_folder(tmp_path, config, capsys):
    typo = "ehad"
    bad = replace(config, freeze=replace(config.freeze, keep_trainable=[typo]))
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(bad))
    out = tmp_path / "run"
    assert main(["--config", str(path), "train", "--out", str(out)]) == 2
    assert not out.exists()
    assert f"error: freeze.keep_trainable: '{typo}' matches no module" in capsys.readouterr().err


def test_layers_spec_is_a_dry_run_with_counts(config_file, capsys, model):
    head_size = sum(p.numel() for p in model.get_submodule(HEAD).parameters())
    total = sum(p.numel() for p in model.parameters())
    args = ["--config", str(config_file), "layers"]
    assert main([*args, "--spec", "!head, idx:0", "--spec", r"re:\.bias$"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[1:-1]}
    assert rows["!head"][1:3] == [str(len(inside(model, HEAD))), f"{head_size:,}"]
    assert rows[r"re:\.bias$"][1] == str(len([n for n, _ in model.named_parameters() if n.endswith(".bias")]))
    assert out[-1].startswith("together:") and f"of {total:,} parameters" in out[-1]
    assert main(["--config", str(config_file), "layers", "--spec", "idx:99"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_the_config_spec_is_read_as_selectors(config):
    spec = freeze_spec(config)
    assert spec == ["!head"], "keep_trainable names what trains"


def test_keep_trainable_star_trains_every_parameter(config):
    config.freeze.keep_trainable = ["*"]
    assert freeze_spec(config) == []
    _, state = prepare_model(config)
    assert state.frozen == set()  # a full fine-tune (the BatchNorm policy may still fix some affines)
