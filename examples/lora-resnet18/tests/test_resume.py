"""Resuming is exact, picks the newest checkpoint that is intact, and survives SIGKILL mid-save."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import child_env, shrink, small_config

from lora_resnet18.checkpoint import CheckpointError, RunFiles, torch_load
from lora_resnet18.cli import main
from lora_resnet18.rng import rng_state, set_rng_state
from lora_resnet18.train import fit

EPOCHS = 2


def tiny_config() -> dict:
    # Resuming is about state, not learning: four steps an epoch show it.
    cfg = small_config()
    cfg.train.batch_size = 16
    shrink(cfg, 64, 32)
    return cfg


@pytest.fixture
def config() -> dict:
    return tiny_config()


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Weights and optimizer state of an uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    fit(tiny_config(), out, epochs=EPOCHS, device="cpu")
    return torch_load(out / "last.ckpt")


def test_resumed_run_equals_uninterrupted_run(tmp_path, config, straight):
    out = tmp_path / "split"
    fit(config, out, epochs=EPOCHS, stop_after=EPOCHS - 1, device="cpu")
    history = fit(config, None, epochs=EPOCHS, resume=out, device="cpu")
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    split = torch_load(out / "last.ckpt")
    assert_same_weights(straight["model"], split["model"])
    for key, value in straight["optimizer"]["state"].items():
        assert_same_weights(value, split["optimizer"]["state"][key])
    assert straight["scheduler"] == split["scheduler"]
    assert (out / "metrics.csv").read_text().count("\n") == EPOCHS + 1


def test_a_resumed_sgd_run_equals_an_uninterrupted_one(tmp_path, config):
    """SGD's momentum buffers come back with the rest: a resume does not restart them at zero."""
    config.train.optimizer = "sgd"
    fit(config, tmp_path / "straight", epochs=EPOCHS, device="cpu")
    fit(config, tmp_path / "split", epochs=EPOCHS, stop_after=EPOCHS - 1, device="cpu")
    fit(config, None, epochs=EPOCHS, resume=tmp_path / "split", device="cpu")
    straight, split = (torch_load(tmp_path / name / "last.ckpt") for name in ("straight", "split"))
    assert_same_weights(straight["model"], split["model"])
    states = straight["optimizer"]["state"]
    assert states and all("momentum_buffer" in state for state in states.values())
    assert states.keys() == split["optimizer"]["state"].keys()
    for key, value in states.items():
        assert_same_weights(value, split["optimizer"]["state"][key])


def test_every_rng_comes_back(config):
    set_rng_state(state := rng_state())
    draws = (random.random(), torch.rand(3), np.random.rand(3))
    set_rng_state(state)
    assert random.random() == draws[0]
    assert torch.equal(torch.rand(3), draws[1])
    assert (np.random.rand(3) == draws[2]).all()


def test_resume_dir_skips_a_damaged_last_ckpt_and_says_why(tmp_path, config, capsys):
    config.checkpoint.keep_last_k = 2
    out = tmp_path / "run"
    fit(config, out, epochs=EPOCHS + 1, stop_after=2, device="cpu")
    assert {"epoch-0000.ckpt", "epoch-0001.ckpt", "last.ckpt"} <= set(RunFiles(out).files)
    data = bytearray((out / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "last.ckpt").write_bytes(bytes(data))
    capsys.readouterr()
    history = fit(config, None, epochs=EPOCHS + 1, resume=out, stop_after=1, device="cpu")
    printed = capsys.readouterr().out
    assert "resume: skipped last.ckpt:" in printed and "does not match" in printed
    assert "resumed from" in printed and "epoch-0001.ckpt after epoch 1" in printed
    assert [row["epoch"] for row in history] == [0, 1, 2]


def test_keep_last_k_keeps_the_newest_epoch_files(tmp_path, config):
    config.checkpoint.keep_last_k = 2
    out = tmp_path / "run"
    fit(config, out, epochs=3, device="cpu")
    epoch_files = sorted(p.name for p in out.glob("epoch-*.ckpt"))
    assert epoch_files == ["epoch-0001.ckpt", "epoch-0002.ckpt"]
    assert sorted(n for n in RunFiles(out).files if n.startswith("epoch-")) == epoch_files
    assert not list(out.glob(".*.tmp")), "a temp file was left behind"


def test_resuming_a_folder_without_checkpoints_is_a_clear_error(tmp_path, config):
    with pytest.raises(CheckpointError, match="no checkpoints.json"):
        fit(config, None, epochs=2, resume=tmp_path, device="cpu")


# Runs the CLI and SIGKILLs itself at one step of a save of last.ckpt:
#   record: the new file is complete in its temp file, checkpoints.json not yet updated
#   rename: checkpoints.json records the new hash, the old last.ckpt is still in place
#   finish: the new last.ckpt is in place, checkpoints.json still lists the old hash too
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    from lora_resnet18.cli import main

    point, when = sys.argv[1], int(sys.argv[2])
    real_replace = os.replace
    saves, after_last = 0, False

    def replace(src, dst):
        global saves, after_last
        dst = Path(dst)
        step = None
        if dst.name == "checkpoints.json" and any(dst.parent.glob(".last.ckpt.*.tmp")):
            saves += 1
            step = "record"
        elif dst.name == "last.ckpt":
            step = "rename"
        elif dst.name == "checkpoints.json" and after_last:
            step = "finish"
        after_last = dst.name == "last.ckpt"
        if step == point and saves == when:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace
    sys.exit(main(sys.argv[3:]))
    """
)


# Each step of the first save (at "rename" no last.ckpt exists yet), and the
# last save, after which a resume has no epoch left to run.
@pytest.mark.slow
@pytest.mark.parametrize(("point", "when"), [("record", 1), ("rename", 1), ("finish", 1), ("record", EPOCHS)])
def test_sigkill_mid_save_leaves_a_resumable_run(tmp_path, config, config_file, straight, point, when):
    out = tmp_path / "run"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = ["--config", str(config_file), "train", "--out", str(out), "--epochs", str(EPOCHS), "--device", "cpu"]
    command = [sys.executable, str(killer), point, str(when), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    if (out / "last.ckpt").exists():
        torch_load(out / "last.ckpt")  # whatever is there is a whole file
    entries = json.loads((out / "checkpoints.json").read_text())["files"]
    assert entries, "nothing was recorded before the kill"
    resume = ["--config", str(config_file), "train", "--resume", str(out), "--epochs", str(EPOCHS), "--device", "cpu"]
    assert main(resume) == 0
    assert_same_weights(straight["model"], torch_load(out / "last.ckpt")["model"])


@pytest.mark.parametrize("damage", ["freeze_manifest", "model", "history", "rng", "scheduler", "epoch", "shapes"])
def test_a_full_checkpoint_missing_a_part_is_one_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    fit(tiny_config(), out, epochs=2, stop_after=1, device="cpu")
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)
    if damage == "epoch":
        checkpoint["epoch"] = "zero"
    elif damage == "shapes":
        model = checkpoint["model"]
        checkpoint["model"] = {key: value[..., :1] if value.dim() else value for key, value in model.items()}
    else:
        del checkpoint[damage]
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "damaged.ckpt"), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "damaged.ckpt" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("epoch", [None, "zero", "missing"])
def test_a_checkpoints_json_entry_without_a_whole_epoch_is_one_line(tmp_path, capsys, epoch):
    out = tmp_path / "run"
    fit(tiny_config(), out, epochs=2, stop_after=1, device="cpu")
    manifest = json.loads((out / "checkpoints.json").read_text())
    if epoch == "missing":
        del manifest["files"]["last.ckpt"]["epoch"]
    else:
        manifest["files"]["last.ckpt"]["epoch"] = epoch
    (out / "checkpoints.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints.json is damaged" in err and err.count("\n") == 1, err
