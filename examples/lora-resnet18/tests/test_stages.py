"""Unfreeze stages: frozen until their epoch, then training in their own scheduled param groups."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import has_params, pretrained_like, to_toml

from lora_resnet18 import run, train
from lora_resnet18.checkpoint import torch_load
from lora_resnet18.cli import main
from lora_resnet18.config import ConfigError, check, load_config, parse_stages
from lora_resnet18.freeze import resolve
from lora_resnet18.model import build_model
from lora_resnet18.saving import DivergedError

EPOCHS = 4


def stage_plan(config: dict) -> tuple[str, list[str], list[str]]:
    """Two stages over the frozen part: its last wholly frozen module at epoch 1, the rest at epoch 2.

    That module is a top-level child, or a block of the child that holds the
    whole frozen part (efficientnet_b0: features.8 of features).
    """
    model, _ = run.prepare_model(config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}

    def params_of(name: str, module: torch.nn.Module) -> set[str]:
        return {f"{name}.{n}" for n, _ in module.named_parameters()}

    parts = [
        name
        for name, module in model.named_modules()
        if name and has_params(module) and params_of(name, module) < frozen  # a proper part of it
    ]
    shallowest = min(name.count(".") for name in parts)
    first = [name for name in parts if name.count(".") == shallowest][-1]
    config.unfreeze.stages = [
        {"epoch": 2, "select": "*", "lr_mult": 0.5, "warmup_epochs": 1},
        {"epoch": 1, "select": first, "lr_mult": 0.1},  # listed out of order on purpose
    ]
    a = sorted(n for n in frozen if n.startswith(first + "."))
    return first, a, sorted(frozen - set(a))


def spy_on_epochs(monkeypatch) -> tuple[list, list]:
    """Parameters and param groups at the start of every epoch fit() runs, and the model it built."""
    seen, models = [], []
    real_epoch, real_prepare = train.train_one_epoch, run.prepare_model

    def prepare(*args, **kwargs):
        model, state = real_prepare(*args, **kwargs)
        models.append(model)
        return model, state

    def one_epoch(net, loader, optimizer, *args, **kwargs):
        weights = {n: p.detach().clone() for n, p in models[0].named_parameters()}
        seen.append((weights, {g["name"]: dict(g, params=None) for g in optimizer.param_groups}))
        return real_epoch(net, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(run, "prepare_model", prepare)
    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    return seen, models


def moved(before, after, names):
    return [n for n in names if not torch.equal(before[n], after[n])]


def test_each_stage_waits_for_its_epoch_then_trains_on_schedule(tmp_path, config, monkeypatch, capsys):
    first, a, b = stage_plan(config)
    seen, models = spy_on_epochs(monkeypatch)
    # Every released tensor must move in its first epoch: that needs features
    # of a sane scale reaching it, as pretrained weights would give.
    pretrained_like(tmp_path / "init.pt", config)
    train.fit(config, tmp_path / "run", epochs=EPOCHS, init=tmp_path / "init.pt", device="cpu")
    end = {n: p.detach() for n, p in models[0].named_parameters()}
    (w0, _), (w1, g1), (w2, g2), (w3, g3) = seen

    assert moved(w0, w1, a + b) == [], "frozen tensors moved before any stage"
    assert moved(w1, w2, a) == a, f"stage {first!r} did not train its selection"
    assert moved(w1, w2, b) == [], "the rest moved before its stage"
    assert moved(w2, w3, b) == b and moved(w3, end, b) == b, "stage '*' did not train the rest"

    lr = config.train.lr
    for epoch, groups in ((1, g1), (2, g2), (3, g3)):
        stage = [g for g in groups.values() if g["name"].startswith("stage")]
        assert {g["lr_mult"] for g in stage if g["name"].startswith("stage1")} == {0.1}
        assert {g["lr_mult"] for g in stage if g["name"].startswith("stage2")} <= {0.5}
        for group in stage:
            cosine = 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS))
            ramp = min(1.0, (epoch - group["start_epoch"] + 1) / (group["warmup_epochs"] + 1))
            assert math.isclose(group["lr"], lr * group["lr_mult"] * cosine * ramp, rel_tol=1e-9), (epoch, group)
    assert any(g["name"].startswith("stage2") for g in g2.values()), "stage 2 added no group"
    assert all(g["warmup_epochs"] == 1 and g["start_epoch"] == 2 for g in g2.values() if g["name"].startswith("stage2"))

    printed = capsys.readouterr().out
    assert f"epoch 1: unfreeze stage {first}: {len(a)} tensors" in printed
    assert "epoch 2: unfreeze stage *:" in printed and "1 warmup epochs" in printed
    manifest = json.loads((tmp_path / "run" / "freeze_manifest.json").read_text())
    assert manifest["stages_done"] == 2 and manifest["frozen"] == []
    assert set(manifest["bn_modes"].values()) <= {"train"}, (
        "a released BatchNorm takes the mode its policy gives a trainable part"
    )
    assert [g["name"] for g in manifest["param_groups"]] == list(g3)


def test_a_stage_with_a_typo_fails_before_training(tmp_path, config, capsys):
    config.unfreeze.stages = [{"epoch": 3, "select": "cf"}]
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(config))
    assert main(["--config", str(path), "train", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    assert "unfreeze.stages[0].select: 'cf' matches no module" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"epoch": 1, "select": "*", "epochs": 2}, "unknown key 'epochs'; did you mean epoch"),
        ({"epoch": 1}, "select is missing"),
        ({"epoch": 0, "select": "*"}, "needs epoch >= 1"),
        ({"epoch": 1, "select": "*", "lr_mult": "0.1"}, "lr_mult = '0.1' has the wrong type"),
        ({"epoch": 1, "select": "*", "patience": 0}, "patience = 0; it must be at least 1 epoch"),
        ({"epoch": 1, "select": "*", "patience": True}, "patience = True has the wrong type"),
        ({"epoch": 1, "select": "*", "restore_best": 1}, "restore_best = 1 has the wrong type"),
    ],
)
def test_a_malformed_stage_is_a_config_error_before_a_model_is_built(config, stage, message):
    config.unfreeze.stages = [stage]
    with pytest.raises(ConfigError, match=message):
        check(config)


def stall_after_epoch_1(monkeypatch) -> None:
    """val_loss by epoch: best at epoch 1, then worse every epoch: a plateau made on purpose."""
    real = train.run_epoch

    def scripted(run, epoch):
        row = real(run, epoch)
        row["val_loss"] = 1.0 if epoch == 0 else 0.9 + 0.01 * (epoch - 1)
        return row

    monkeypatch.setattr(train, "run_epoch", scripted)


def plateau_config(config, **stage) -> str:
    first, _, _ = stage_plan(config)
    config.unfreeze.stages = [{"select": first, **stage}]
    config.checkpoint.monitor, config.checkpoint.mode = "val_loss", "min"
    return first


def test_a_stage_with_patience_starts_when_the_metric_stalls(tmp_path, config, monkeypatch, capsys):
    plateau_config(config, epoch=5, patience=2)
    stall_after_epoch_1(monkeypatch)
    seen, _ = spy_on_epochs(monkeypatch)
    train.fit(config, tmp_path / "run", epochs=6, device="cpu")
    staged = [any(name.startswith("stage") for name in groups) for _, groups in seen]
    # Epochs 2 and 3 did not beat epoch 1: the stage starts at 4, before its epoch 5.
    assert staged == [False] * 4 + [True] * 2
    assert json.loads((tmp_path / "run" / "freeze_manifest.json").read_text())["stage_epochs"] == [4]
    assert "(val_loss has not improved for 2 epochs)" in capsys.readouterr().out


def test_a_stage_with_patience_starts_at_its_epoch_if_the_metric_keeps_improving(tmp_path, config, monkeypatch, capsys):
    plateau_config(config, epoch=2, patience=3)
    real = train.run_epoch
    monkeypatch.setattr(train, "run_epoch", lambda run, epoch: {**real(run, epoch), "val_loss": 1.0 - 0.1 * epoch})
    train.fit(config, tmp_path / "run", epochs=3, device="cpu")
    assert json.loads((tmp_path / "run" / "freeze_manifest.json").read_text())["stage_epochs"] == [2]
    assert "(its epoch; val_loss stalled 0 of 3 epochs)" in capsys.readouterr().out


@pytest.mark.parametrize("stop_after", [4, 5])
def test_a_resume_across_plateau_stages_is_exact(tmp_path, config, monkeypatch, stop_after):
    """Before the first stage, and between the two: the second counts its patience from the first's start."""
    first = plateau_config(config, epoch=9, patience=2)
    config.unfreeze.stages.append({"select": "*", "epoch": 9, "patience": 2})
    stall_after_epoch_1(monkeypatch)
    train.fit(config, tmp_path / "whole", epochs=8, device="cpu")
    train.fit(config, tmp_path / "parts", epochs=8, stop_after=stop_after, device="cpu")
    train.fit(None, None, resume=tmp_path / "parts", device="cpu")
    whole, parts = torch_load(tmp_path / "whole" / "last.ckpt"), torch_load(tmp_path / "parts" / "last.ckpt")
    # Stage 0 waits out epochs 2-3 after the best (epoch 1); stage 1 counts from stage 0's start at 4.
    assert whole["freeze_manifest"]["stage_epochs"] == parts["freeze_manifest"]["stage_epochs"] == [4, 6], first
    assert all(torch.equal(whole["model"][name], parts["model"][name]) for name in whole["model"])


def test_keys_of_the_old_single_unfreeze_point_say_where_they_moved(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("[freeze]\nunfreeze_at_epoch = 3\n")
    with pytest.raises(ConfigError, match=r"moved; write \[\[unfreeze.stages\]\] epoch = N"):
        load_config(path)


def test_freeze_from_puts_another_runs_freeze_state_back(tmp_path, config, capsys):
    stage_plan(config)
    config.unfreeze.stages = config.unfreeze.stages[1:]  # the first stage only
    first_run = tmp_path / "first"
    train.fit(config, first_run, epochs=2, device="cpu")
    saved = json.loads((first_run / "freeze_manifest.json").read_text())
    assert saved["stages_done"] == 1 and saved["frozen"], "the manifest should hold a part-frozen state"

    other = load_config()  # a different spec: the manifest must win
    other.freeze.keep_trainable = []
    other.train = config.train
    other.data = config.data
    other.model.pretrained = False
    path = tmp_path / "other.toml"
    path.write_text(to_toml(other))
    second_run = tmp_path / "second"
    manifest_file = first_run / "freeze_manifest.json"
    args = ["--config", str(path), "train", "--out", str(second_run), "--epochs", "1"]
    args += ["--freeze-from", str(manifest_file)]
    assert main(args) == 0
    again = json.loads((second_run / "freeze_manifest.json").read_text())
    assert again["requires_grad"] == saved["requires_grad"]
    assert again["bn_modes"] == saved["bn_modes"]

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**saved, "spec_frozen": ["no.such.weight"]}))
    args[-1] = str(broken)
    args[4] = str(tmp_path / "third")
    capsys.readouterr()
    assert main(args) == 2 and not (tmp_path / "third").exists()
    assert "'no.such.weight' is not a parameter of the model" in capsys.readouterr().err


def test_resume_after_a_stage_keeps_the_released_part_training(tmp_path, config):
    """Re-applying the config's spec on resume would freeze the backbone again (Lightning #21901)."""
    first, a, b = stage_plan(config)
    out = tmp_path / "run"
    train.fit(config, out, epochs=EPOCHS, stop_after=3, device="cpu")
    before = torch_load(out / "last.ckpt")
    assert before["freeze_manifest"]["stages_done"] == 2
    train.fit(config, None, epochs=EPOCHS, resume=out, device="cpu")
    after = torch_load(out / "last.ckpt")
    assert after["epoch"] == 3
    assert moved(before["model"], after["model"], a + b) == a + b, "released tensors stopped training after resume"
    assert [g["name"] for g in after["optimizer"]["param_groups"]] == [
        g["name"] for g in before["freeze_manifest"]["param_groups"]
    ]


def test_a_stage_epoch_that_diverges_leaves_freeze_manifest_agreeing_with_last_ckpt(tmp_path, config, monkeypatch):
    stage_plan(config)
    real_epoch = train.train_one_epoch

    def diverges_once_a_stage_began(net, loader, optimizer, *args, **kwargs):
        if any(group["name"].startswith("stage") for group in optimizer.param_groups):
            raise DivergedError("the loss is nan")
        return real_epoch(net, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", diverges_once_a_stage_began)
    out = tmp_path / "run"
    with pytest.raises(DivergedError):
        train.fit(config, out, epochs=EPOCHS, device="cpu")
    saved = torch_load(out / "last.ckpt")["freeze_manifest"]
    on_disk = json.loads((out / "freeze_manifest.json").read_text())
    assert saved["stages_done"] == 0 and on_disk["stages_done"] == 0, "the manifest ran ahead of last.ckpt"
    assert on_disk["frozen"] == saved["frozen"]


def test_every_default_stage_resolves(config):
    model = build_model(config)
    for i, stage in enumerate(parse_stages(config.unfreeze.stages)):
        resolve(model, stage.select, f"stage {i}")
