"""torchrun with 2 gloo processes on CPU: the ranks agree and rank 0 alone writes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import shrink, to_toml, torchrun

from custom_char_model.checkpoint import RunFiles
from custom_char_model.config import Config

# Every test here starts torchrun: seconds of process-group setup each.
pytestmark = pytest.mark.slow

PROCESSES = 2

# Runs fit() in each process torchrun starts and saves that rank's final
# weights and buffers, so the test can compare ranks with each other.
HARNESS = textwrap.dedent(
    """
    import json, os, sys

    import torch

    from custom_char_model import run, train
    from custom_char_model.config import from_dict
    from custom_char_model.distributed import stop

    config = from_dict(json.loads(sys.argv[1]))
    out, dump, options = sys.argv[2] or None, sys.argv[3], json.loads(sys.argv[4])
    models = []
    prepare = run.prepare_model

    def keep(*args, **kwargs):
        model, state = prepare(*args, **kwargs)
        models.append(model)
        return model, state

    run.prepare_model = keep
    train.fit(config, out, device="cpu", **options)
    torch.save(models[0].state_dict(), os.path.join(dump, "rank" + os.environ["RANK"] + ".pt"))
    stop()
    """
)


def ddp_fit(
    tmp_path: Path, config: Config, out: Path | None, processes: int = PROCESSES, **options
) -> list[dict[str, torch.Tensor]]:
    """fit() under torchrun; every rank's final state_dict, in rank order."""
    harness, dump = tmp_path / "harness.py", tmp_path / f"ranks-of-{processes}"
    harness.write_text(HARNESS)
    dump.mkdir(exist_ok=True)
    arguments = [json.dumps(config.to_dict()), str(out or ""), str(dump), json.dumps(options)]
    torchrun(str(harness), *arguments, processes=processes)
    return [torch.load(dump / f"rank{rank}.pt", weights_only=True) for rank in range(processes)]


@pytest.fixture
def config(config: Config) -> Config:
    # 16 samples per process and step; both datasets split evenly over the ranks.
    shrink(config, 128, 64)
    return config


def test_every_rank_ends_with_identical_weights(tmp_path, config):
    out = tmp_path / "run"
    # Stop after one epoch and resume: every rank reads rank 0's checkpoint.
    ddp_fit(tmp_path, config, out, stop_after=1)
    ranks = ddp_fit(tmp_path, config, None, resume=str(out))
    assert ranks[0].keys() == ranks[1].keys()
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{key} differs between rank 0 and rank 1"
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["epoch"] == config.train.epochs - 1 and len(saved["rng"]) == PROCESSES
    for key, value in ranks[0].items():
        assert torch.equal(value, saved["model"][key]), key


def test_torchrun_runs_the_cli_and_only_rank_0_writes(tmp_path, config_file):
    out = tmp_path / "run"
    args = ["--config", str(config_file), "train", "--out", str(out), "--epochs", "1", "--device", "cpu"]
    proc = torchrun("-m", "custom_char_model", *args, processes=PROCESSES)
    assert proc.stdout.count("trainable ") == 1, "the freeze summary must be printed once, by rank 0"
    assert proc.stdout.count("epoch 0: train_loss") == 1
    files = RunFiles(out)
    for name in files.files:
        files.verify(name)
    assert not list(out.glob(".*.tmp")), "no temp file may be left behind"
    assert (out / "metrics.csv").read_text().count("\n") == 2


def test_rank_0_alone_chooses_the_checkpoint_to_resume(tmp_path, config_file):
    out = tmp_path / "run"
    args = ["--config", str(config_file), "train", "--epochs", "2", "--device", "cpu"]
    torchrun("-m", "custom_char_model", *args, "--out", str(out), "--stop-after", "1", processes=PROCESSES)
    (out / "last.ckpt").write_bytes(b"\0" * 64)  # damaged: the epoch file next to it must be chosen
    proc = torchrun("-m", "custom_char_model", *args, "--resume", str(out), processes=PROCESSES)
    assert proc.stdout.count("resume: skipped last.ckpt") == 1, proc.stdout
    assert proc.stdout.count("resumed from ") == 1 and "epoch-0000.ckpt" in proc.stdout
    assert proc.stdout.count("epoch 1: train_loss") == 1
    nowhere = str(tmp_path / "nowhere")
    missing = torchrun("-m", "custom_char_model", *args, "--resume", nowhere, processes=PROCESSES, check=False)
    assert missing.returncode != 0 and "no such checkpoint or run folder" in missing.stderr


def test_sync_bn_is_refused_on_cpu_before_anything_is_written(tmp_path, config):
    config.train.sync_bn = True
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(config))
    out = tmp_path / "run"
    args = ["--config", str(config_file), "train", "--out", str(out), "--device", "cpu"]
    proc = torchrun("-m", "custom_char_model", *args, processes=PROCESSES, check=False)
    assert proc.returncode != 0
    # Every process meets the same bad value; one line says it (one per machine).
    assert proc.stderr.count("train.sync_bn needs CUDA") == 1, proc.stderr
    assert not out.exists()
