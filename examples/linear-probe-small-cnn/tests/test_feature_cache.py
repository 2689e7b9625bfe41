"""The feature cache: a linear probe trains its head on backbone features computed once, and only when that is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import fitted, linear_probe, shrink

from linear_probe_small_cnn.config import ConfigError
from linear_probe_small_cnn.data import DEFAULT_DATA, make_datasets
from linear_probe_small_cnn.features import cache_decision
from linear_probe_small_cnn.model import HEAD
from linear_probe_small_cnn.run import prepare_model


def head_of(model):
    return {n: p.detach().clone() for n, p in model.get_submodule(HEAD).named_parameters()}


def test_cached_and_uncached_training_give_the_same_head(tmp_path, config, monkeypatch, capsys):
    linear_probe(config, "keep_trainable")
    config.train.cache_features = False
    plain, plain_history = fitted(config, tmp_path, "plain", monkeypatch)
    assert "feature cache: off (train.cache_features = false)" in capsys.readouterr().out
    config.train.cache_features = "auto"
    cached, cached_history = fitted(config, tmp_path, "cached", monkeypatch)
    assert "feature cache: on (only the head trains" in capsys.readouterr().out
    for name, value in head_of(plain).items():
        assert torch.allclose(head_of(cached)[name], value, atol=1e-5), name
    one_sample = 1 / len(make_datasets(DEFAULT_DATA, config)[1])
    for a, b in zip(plain_history, cached_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=one_sample)
    for key, value in plain.state_dict().items():
        if not key.startswith(HEAD + "."):
            assert torch.equal(value, cached.state_dict()[key]), f"{key}: the backbone moved"


def test_the_cache_is_dropped_when_a_stage_unfreezes(tmp_path, config, monkeypatch, capsys):
    linear_probe(config, "keep_trainable")
    config.unfreeze.stages = [{"epoch": 1, "select": "*"}]
    torch.manual_seed(config.train.seed)  # the initial weights fit() will build
    model, _ = prepare_model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shrink(config, 64, 32)
    trained, _ = fitted(config, tmp_path, "run", monkeypatch, epochs=2)
    printed = capsys.readouterr().out
    assert "feature cache: on" in printed and "epoch 1: feature cache dropped" in printed
    backbone = [n for n in before if not n.startswith(HEAD + ".")]
    after = dict(trained.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in backbone), "the backbone did not train"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bn_modes": {"type:BatchNorm2d": "train"}}, "updates its statistics"),
        # The first parameter tensor trains too.
        ({"keep_trainable": ["head", "param_idx:0"]}, "outside the head train"),
    ],
)
def test_auto_says_why_it_does_not_cache_and_true_refuses(config, change, reason):
    linear_probe(config, "keep_trainable")
    vars(config.freeze).update(change)
    model, _ = prepare_model(config)
    on, why = cache_decision(model, "auto", [])
    assert not on and reason in why
    with pytest.raises(ConfigError, match="train.cache_features = true, but"):
        cache_decision(model, True, [])
    on, why = cache_decision(model, "auto", ["training images are randomly augmented"])
    assert not on and "augmented" in why
