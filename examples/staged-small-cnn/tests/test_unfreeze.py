"""Unfreezing at epoch 1: a new param group that follows the schedule."""

from __future__ import annotations

import json
import math

import torch
from torch.utils.data import DataLoader

from staged_small_cnn.checkpoint import torch_load
from staged_small_cnn.data import make_datasets
from staged_small_cnn.train import (
    cosine_schedule,
    fit,
    make_optimizer,
    prepare_model,
    train_one_epoch,
    unfreeze,
)


def test_unfrozen_tensors_train_in_the_next_epoch(config):
    model, manifest = prepare_model(config)
    optimizer = make_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_set, _ = make_datasets("synthetic", config)
    loader = DataLoader(train_set, batch_size=32, shuffle=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), use_amp=False)
    state = model.state_dict()
    assert all(torch.equal(state[n], initial[n]) for n in manifest["frozen"])
    unfreeze(model, optimizer, scheduler, config["freeze"]["unfreeze_lr_mult"])
    train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), use_amp=False)
    state = model.state_dict()
    assert all(not torch.equal(state[n], initial[n]) for n in manifest["frozen"])


def test_frozen_part_waits_for_its_epoch_then_trains(tmp_path, config):
    at = config["freeze"]["unfreeze_at_epoch"]
    model, manifest = prepare_model(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(initial, tmp_path / "init.pt")
    out = tmp_path / "run"
    fit(config, out, epochs=at + 1, stop_after=at, init=tmp_path / "init.pt", device="cpu")
    before = torch_load(out / "last.ckpt")["model"]
    for name in manifest["frozen"]:
        assert torch.equal(before[name], initial[name]), f"{name} moved before epoch {at}"
    fit(config, out, epochs=at + 1, resume=out / "last.ckpt", device="cpu")
    after = torch_load(out / "last.ckpt")
    assert any(not torch.equal(after["model"][n], initial[n]) for n in manifest["frozen"])
    assert [g["name"] for g in after["optimizer"]["param_groups"]] == ["trainable", "unfrozen"]
    assert json.loads((out / "freeze_manifest.json").read_text())["frozen"] == []


def test_unfrozen_group_follows_the_schedule_at_its_own_rate(config):
    model, _ = prepare_model(config)
    optimizer = make_optimizer(model, config)
    epochs = 6
    scheduler = cosine_schedule(optimizer, epochs)
    for _ in range(2):
        optimizer.step()  # no gradients yet: only keeps the step order torch expects
        scheduler.step()
    mult = config["freeze"]["unfreeze_lr_mult"]
    unfreeze(model, optimizer, scheduler, mult)
    assert all(p.requires_grad for p in model.parameters())
    base = config["train"]["lr"]
    for epoch in range(2, epochs):
        expected = base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        assert math.isclose(optimizer.param_groups[0]["lr"], expected, rel_tol=1e-9)
        assert math.isclose(optimizer.param_groups[1]["lr"], expected * mult, rel_tol=1e-9)
        optimizer.step()
        scheduler.step()
