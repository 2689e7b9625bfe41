"""A resume is the run that was started: stopped mid-epoch and resumed, it ends where an unbroken run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from classroom_small_cnn import train
from classroom_small_cnn.config import Stage
from classroom_small_cnn.model import build_model


def staged(config):
    """Three epochs, the first child released at epoch 1, frozen BatchNorm swapped out until then."""
    first = next(n for n, c in build_model(config).named_children() if any(True for _ in c.parameters()))
    config.train.epochs = 3
    config.freeze.frozen, config.freeze.bn_policy = ["!head"], "replace_frozen"
    config.freeze.stages = [Stage(epoch=1, select=[first], lr_mult=0.5)]
    return config


def test_a_run_stopped_mid_epoch_and_resumed_equals_one_that_never_stopped(config, tmp_path: Path, monkeypatch):
    whole = train.fit(staged(config), tmp_path / "whole")

    def stops_in_epoch_2(dataset, config, epoch):
        for step, batch in enumerate(real_loader(dataset, config, epoch)):
            if epoch == 2 and step == 1:
                raise KeyboardInterrupt  # as Ctrl-C or a kill would, mid-epoch
            yield batch

    real_loader = train.train_loader
    monkeypatch.setattr(train, "train_loader", stops_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.fit(staged(config), tmp_path / "broken")
    monkeypatch.setattr(train, "train_loader", real_loader)
    assert train.main(["train", "--resume", str(tmp_path / "broken")]) == 0

    a = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and b["history"] == whole
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "whole" / "metrics.csv").read_text() == (tmp_path / "broken" / "metrics.csv").read_text()


def test_resume_refuses_other_data_and_overwrite(config, tmp_path: Path, capsys):
    train.fit(config, tmp_path / "run")
    before = (tmp_path / "run" / "last.ckpt").read_bytes()
    assert train.main(["train", "--resume", str(tmp_path / "run"), "--overwrite"]) == 2
    assert train.main(["train", "--resume", str(tmp_path / "run"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "takes no --overwrite" in err[0] and "the run trained on --data" in err[1]
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == before


def test_resume_refuses_a_file_that_is_not_a_full_checkpoint(tmp_path: Path, capsys):
    (tmp_path / "run").mkdir()
    torch.save({"epoch": "zero"}, tmp_path / "run" / "last.ckpt")
    assert train.main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "is not a full checkpoint of this project" in capsys.readouterr().err
