"""EMA of what trains: only trainable tensors are averaged, a stage's release joins it, and it is saved and resumed."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import fitted
from torch.utils.data import DataLoader

from staged_small_cnn import ema as ema_module
from staged_small_cnn import train
from staged_small_cnn.checkpoint import read_state_dict, torch_load
from staged_small_cnn.config import ConfigError, check
from staged_small_cnn.data import DEFAULT_DATA, make_datasets
from staged_small_cnn.ema import EMA
from staged_small_cnn.rng import seed_everything
from staged_small_cnn.run import prepare_model
from staged_small_cnn.saving import METRIC_COLUMNS


@pytest.fixture
def ema_config(config):
    """Something frozen for the whole run, and the average on."""
    config.unfreeze.stages = []
    config.train.ema_decay = 0.9
    return config


def test_only_the_trainable_parameters_are_averaged(ema_config):
    model, _ = prepare_model(ema_config)
    ema = EMA(model, 0.9, warmup=False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) < len(list(model.parameters())), "the fixture should freeze something"
    assert list(ema.shadow) == trainable
    size = sum(t.numel() for t in ema.shadow.values())
    assert size == sum(p.numel() for p in model.parameters() if p.requires_grad), "frozen tensors were copied"


def test_the_average_moves_by_one_minus_the_decay_and_warms_up():
    model = torch.nn.Linear(2, 1)
    start = model.weight.detach().clone()
    ema = EMA(model, 0.5, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 0.5)
    warm = EMA(model, 0.999, warmup=True)
    assert warm.rate() == pytest.approx(1 / ema_module.WARMUP)
    warm.update()
    assert warm.rate() == pytest.approx(2 / (ema_module.WARMUP + 1))


def test_every_optimizer_step_updates_it_and_applied_gives_the_trained_weights_back():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMA(model, 0.9, warmup=False)
    ema.follow(optimizer)
    model(torch.ones(4, 2)).sum().backward()
    optimizer.step()
    assert ema.updates == 1
    trained, averaged = model.weight.detach().clone(), ema.shadow["weight"].clone()
    with pytest.raises(RuntimeError, match="in the middle"), ema.applied():
        assert torch.equal(model.weight, averaged)
        raise RuntimeError("an evaluation that fails in the middle")
    assert torch.equal(model.weight, trained) and torch.equal(ema.shadow["weight"], averaged)


def rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_run_reports_the_averaged_weights_every_epoch(tmp_path, ema_config, monkeypatch):
    model, _ = fitted(ema_config, tmp_path, "run", monkeypatch, epochs=2)
    out = tmp_path / "run"
    table = rows(out / "metrics.csv")
    assert tuple(table[0]) == METRIC_COLUMNS and METRIC_COLUMNS[-2:] == ("val_loss_ema", "val_acc_ema")
    assert all(math.isfinite(float(row["val_loss_ema"])) for row in table)
    averaged = read_state_dict(out / "ema.safetensors")
    trained = dict(model.named_parameters())
    moved = [name for name, p in trained.items() if p.requires_grad and not torch.equal(p.detach(), averaged[name])]
    assert moved, "the average equals the trained weights"
    frozen = [name for name, p in trained.items() if not p.requires_grad]
    assert all(torch.equal(trained[name].detach(), averaged[name]) for name in frozen), "a frozen tensor differs"
    # The saved average, evaluated alone, gives the logged number: it is what was measured.
    model.load_state_dict(averaged)
    _, val_set = make_datasets(DEFAULT_DATA, ema_config)
    loss, _ = train.evaluate(model, DataLoader(val_set, ema_config.train.batch_size), torch.device("cpu"))
    assert loss == pytest.approx(float(table[-1]["val_loss_ema"]), rel=1e-5)


def test_a_stage_release_joins_the_average_from_its_value_then(tmp_path, ema_config, monkeypatch):
    ema_config.unfreeze.stages = [{"epoch": 1, "select": "*"}]
    frozen = [name for name, p in prepare_model(ema_config)[0].named_parameters() if not p.requires_grad]
    joined, averages = [], []
    real = EMA.add

    def add(self, model, names):
        real(self, model, names)
        joined.append({name: self.shadow[name].clone() for name in names})
        averages.append(self)

    monkeypatch.setattr(EMA, "add", add)
    model, _ = fitted(ema_config, tmp_path, "run", monkeypatch, epochs=2)
    assert len(joined) == 2 and sorted(joined[1]) == sorted(frozen), "the released tensors did not join at epoch 1"
    seed_everything(ema_config.train.seed)  # as fit() does: the same initial weights
    start = prepare_model(ema_config)[0].state_dict()
    # Frozen until epoch 1, so their value at the release is the initial one.
    assert all(torch.equal(joined[1][name], start[name]) for name in frozen), "a release joined from another value"
    shadow = averages[-1].shadow
    assert any(not torch.equal(shadow[name], start[name]) for name in frozen), "the released tensors were not averaged"


def test_monitor_may_name_an_ema_metric_only_with_the_average_on(config):
    config.checkpoint.monitor, config.checkpoint.mode = "val_loss_ema", "min"
    with pytest.raises(ConfigError, match=r"checkpoint.monitor = 'val_loss_ema': an _ema metric only with"):
        check(config)
    config.train.ema_decay = 0.9
    check(config)


def test_best_holds_the_averaged_weights_when_an_ema_metric_decides(tmp_path, ema_config):
    ema_config.checkpoint.monitor, ema_config.checkpoint.mode = "val_loss_ema", "min"
    train.fit(ema_config, tmp_path / "run", epochs=1, device="cpu")
    best = read_state_dict(tmp_path / "run" / "best.safetensors")
    averaged = read_state_dict(tmp_path / "run" / "ema.safetensors")
    assert all(torch.equal(best[name], averaged[name]) for name in averaged)


def test_a_bad_decay_is_one_line(config):
    config.train.ema_decay = 1.0
    with pytest.raises(ConfigError, match=r"train.ema_decay = 1.0: 0 \(off\) or a number in \(0, 1\)"):
        check(config)


def test_a_resume_continues_the_same_average(tmp_path, ema_config):
    train.fit(ema_config, tmp_path / "whole", epochs=3, device="cpu")
    train.fit(ema_config, tmp_path / "parts", epochs=3, stop_after=2, device="cpu")
    train.fit(None, None, resume=tmp_path / "parts", device="cpu")
    whole, parts = (torch_load(tmp_path / name / "last.ckpt")["ema"] for name in ("whole", "parts"))
    assert whole["updates"] == parts["updates"] > 0
    assert all(torch.equal(whole["shadow"][name], parts["shadow"][name]) for name in whole["shadow"])
