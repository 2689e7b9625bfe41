"""torchrun with 2 gloo processes on CPU: the ranks agree and rank 0 alone writes; with
every BatchNorm fixed, the result equals one process on the same global batch."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import shrink, to_toml, torchrun

from staged_small_cnn.checkpoint import RunFiles
from staged_small_cnn.config import Config
from staged_small_cnn.run import prepare_model

# Every test here starts torchrun: seconds of process-group setup each.
pytestmark = pytest.mark.slow

PROCESSES = 2

# Runs fit() in each process torchrun starts and saves that rank's final
# weights and buffers, so the test can compare ranks with each other.
HARNESS = textwrap.dedent(
    """
    import json, os, sys

    import torch

    from staged_small_cnn import run, train
    from staged_small_cnn.config import from_dict
    from staged_small_cnn.distributed import stop

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
    # Unfreeze in the second epoch: DDP must be rebuilt around the new tensors.
    config.unfreeze.stages[0]["epoch"] = 1
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


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, config):
    # The premise: BatchNorm normalises with fixed statistics even in train mode,
    # so splitting a batch over processes cannot change what it computes.
    model, _ = prepare_model(config)
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))

    # Both through the same harness; one process sees the whole batch.
    single = ddp_fit(tmp_path, config, tmp_path / "single", processes=1)[0]
    rank0 = ddp_fit(tmp_path, config, tmp_path / "ddp")[0]
    # Gradients are summed in another order, and Adam's normalised step turns
    # that rounding into a few % of one lr step (measured: 4% at lr 1e-3 on
    # small_cnn, 2.6% at lr 1e-2 on mobilenet_v3_large). A wrong split of the
    # batch moves weights by whole steps.
    step = config.train.lr
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=0.1 * step, msg=lambda m, key=key: f"{key}: {m}")
    # Losses and accuracy are summed over both ranks' shares: the same numbers.
    for x, y in zip(metrics(tmp_path / "single"), metrics(tmp_path / "ddp"), strict=True):
        assert x == pytest.approx(y, rel=1e-4)


def metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{key: float(row[key]) for key in ("train_loss", "train_acc", "val_loss", "val_acc")} for row in rows]


def test_torchrun_runs_the_cli_and_only_rank_0_writes(tmp_path, config_file):
    out = tmp_path / "run"
    args = ["--config", str(config_file), "train", "--out", str(out), "--epochs", "1", "--device", "cpu"]
    proc = torchrun("-m", "staged_small_cnn", *args, processes=PROCESSES)
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
    torchrun("-m", "staged_small_cnn", *args, "--out", str(out), "--stop-after", "1", processes=PROCESSES)
    (out / "last.ckpt").write_bytes(b"\0" * 64)  # damaged: the epoch file next to it must be chosen
    proc = torchrun("-m", "staged_small_cnn", *args, "--resume", str(out), processes=PROCESSES)
    assert proc.stdout.count("resume: skipped last.ckpt") == 1, proc.stdout
    assert proc.stdout.count("resumed from ") == 1 and "epoch-0000.ckpt" in proc.stdout
    assert proc.stdout.count("epoch 1: train_loss") == 1
    nowhere = str(tmp_path / "nowhere")
    missing = torchrun("-m", "staged_small_cnn", *args, "--resume", nowhere, processes=PROCESSES, check=False)
    assert missing.returncode != 0 and "no such checkpoint or run folder" in missing.stderr


def test_sync_bn_is_refused_on_cpu_before_anything_is_written(tmp_path, config):
    config.train.sync_bn = True
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(config))
    out = tmp_path / "run"
    args = ["--config", str(config_file), "train", "--out", str(out), "--device", "cpu"]
    proc = torchrun("-m", "staged_small_cnn", *args, processes=PROCESSES, check=False)
    assert proc.returncode != 0
    # Every process meets the same bad value; one line says it (one per machine).
    assert proc.stderr.count("train.sync_bn needs CUDA") == 1, proc.stderr
    assert not out.exists()
