"""TensorBoard: every metric per epoch, and a missing package named before the run folder exists."""

from __future__ import annotations

import sys

import pytest

from linear_probe_small_cnn.config import ConfigError, load_config
from linear_probe_small_cnn.train import fit


def test_tensorboard_logs_every_metric_per_epoch(tmp_path, config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config.log.tensorboard = True
    history = fit(config, tmp_path / "run", epochs=2, device="cpu")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [0, 1]
        assert [e.value for e in logged] == pytest.approx([row[key] for row in history])


def test_tensorboard_without_the_package_fails_before_the_run_folder(tmp_path, config, monkeypatch):
    config.log.tensorboard = True
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        fit(config, tmp_path / "run", epochs=1, device="cpu")
    assert not (tmp_path / "run").exists()


def test_tensorboard_chosen_at_copy_time_is_on_until_the_config_turns_it_off():
    assert load_config().log.tensorboard is True
    assert load_config(overrides=["log.tensorboard=false"]).log.tensorboard is False
