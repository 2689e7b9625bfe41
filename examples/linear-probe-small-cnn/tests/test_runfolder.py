"""A run folder holds one run: never overwritten by accident, never written by two processes, never given NaN."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import child_env, shrink, to_toml

from linear_probe_small_cnn import run as run_module
from linear_probe_small_cnn.checkpoint import CheckpointError, RunFiles, read_state_dict
from linear_probe_small_cnn.cli import main
from linear_probe_small_cnn.config import load_config
from linear_probe_small_cnn.freeze import FreezeSpecError
from linear_probe_small_cnn.model import build_model
from linear_probe_small_cnn.run import prepare_model
from linear_probe_small_cnn.saving import DivergedError
from linear_probe_small_cnn.train import fit


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture
def small(config):
    shrink(config, 64, 32)
    return config


def test_a_second_train_into_a_run_folder_is_refused_and_changes_nothing(tmp_path, small, capsys):
    out = tmp_path / "run"
    fit(small, out, epochs=2, device="cpu")
    before = files_of(out)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(small))
    assert main(["--config", str(path), "train", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run" in err and f"--resume {out}" in err and "another --out" in err
    assert err.count("\n") == 1
    assert files_of(out) == before, "a refused run wrote into the folder"


def test_overwrite_starts_over_and_keeps_nothing_of_the_old_run(tmp_path, small):
    out = tmp_path / "run"
    fit(small, out, epochs=3, device="cpu")
    history = fit(small, out, epochs=1, device="cpu", overwrite=True)
    assert [row["epoch"] for row in history] == [0]
    assert (out / "metrics.csv").read_text().count("\n") == 2, "only the new run's epoch"
    files = RunFiles(out)
    assert not [name for name in files.files if name.startswith("epoch-0002")]
    for name in files.files:
        files.verify(name)
        assert files.files[name]["epoch"] == 0, name


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    lock = open(sys.argv[1], "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write(f"{os.getpid()}\\n")
    lock.flush()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_a_folder_in_use_is_refused_at_once_naming_the_holder(tmp_path, small, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        path = tmp_path / "config.toml"
        path.write_text(to_toml(small))
        assert main(["--config", str(path), "train", "--epochs", "1", "--out", str(out)]) == 2
        assert f"{out} is in use by another run (process {holder.pid})" in capsys.readouterr().err
        assert not (out / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no stale lock: the operating system dropped it.
    assert main(["--config", str(path), "train", "--epochs", "1", "--out", str(out)]) == 0


def test_the_temp_files_of_a_killed_save_are_cleaned_up(tmp_path, small):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".best.pt.x1y2z3.tmp").write_bytes(b"half a file")
    fit(small, out, epochs=1, device="cpu")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_a_diverging_run_stops_and_saves_no_non_finite_weights(tmp_path, small, monkeypatch):
    out = tmp_path / "run"
    fit(small, out, epochs=1, device="cpu")
    good = files_of(out)
    # The loss of the second step is NaN, as after a step at far too high an lr.
    real, calls = torch.nn.functional.cross_entropy, []

    def exploding(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", exploding)
    with pytest.raises(DivergedError, match=r"epoch 0, step 2: the loss is not finite; lower train.lr"):
        fit(small, tmp_path / "diverged", epochs=2, device="cpu")
    # Nothing was saved, so the folder the run made is gone: a retry with a lower lr needs no --overwrite.
    assert not (tmp_path / "diverged").exists()
    for path in (tmp_path / "diverged").glob("*"):
        if path.suffix in (".pt", ".ckpt"):
            state = torch.load(path, weights_only=True)
            weights = state.get("model", state)
            assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path
    assert files_of(out) == good


def test_weights_that_stop_being_finite_are_never_saved(tmp_path, small, monkeypatch):
    from linear_probe_small_cnn import train

    real = train.run_epoch

    def poisoned(run, epoch):
        row = real(run, epoch)
        if epoch == 1:
            with torch.no_grad():
                next(p for p in run.model.parameters() if p.requires_grad).fill_(float("nan"))
        return row

    monkeypatch.setattr(train, "run_epoch", poisoned)
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="epoch 1: 1 tensors are not finite"):
        fit(small, out, epochs=3, device="cpu")
    files = RunFiles(out)
    for name in files.files:
        files.verify(name)
        assert files.files[name]["epoch"] == 0, f"{name} was written after epoch 0"


def test_an_init_file_holding_nan_is_refused_naming_the_tensors(tmp_path, small):
    state = build_model(small).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"1 tensors are not finite \\(first: {name}\\)"):
        prepare_model(small, init=tmp_path / "nan.pt")


def test_an_empty_keep_trainable_freezes_everything_and_is_refused(small):
    small.freeze.keep_trainable = []
    with pytest.raises(FreezeSpecError, match="nothing would train"):
        prepare_model(small)


@pytest.mark.parametrize("flag", ["--epochs", "--stop-after"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_an_epoch_count_below_one_is_refused(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "run"), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: '{value}' is not a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resume_keeps_the_config_that_trained_it_and_refuses_another(tmp_path, small, capsys):
    out = tmp_path / "run"
    small.train.lr = 0.002
    fit(small, out, epochs=3, stop_after=1, device="cpu")
    changed = tmp_path / "changed.toml"
    small.train.lr, small.train.num_workers = 0.004, 0
    changed.write_text(to_toml(small))
    assert main(["--config", str(changed), "train", "--resume", str(out)]) == 2
    assert "train.lr: 0.002 -> 0.004" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "5"]) == 2
    assert "train.epochs: 3 -> 5" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--init", str(out / "last.ckpt")]) == 2
    assert "--init starts a new run and --resume continues one" in capsys.readouterr().err
    # --set is laid over the saved config, and held to the same rule.
    assert main(["--set", "train.lr=0.004", "train", "--resume", str(out)]) == 2
    assert "train.lr: 0.002 -> 0.004" in capsys.readouterr().err
    # No --config: the saved one (lr 0.002, 3 epochs), not the packaged defaults;
    # the worker count cannot change the result, so --set may change it.
    assert main(["--set", "train.num_workers=0", "train", "--resume", str(out)]) == 0
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 2 and saved["config"]["train"]["lr"] == 0.002 and saved["config"]["train"]["epochs"] == 3


def test_a_resume_may_change_what_cannot_change_the_result(tmp_path, small):
    out = tmp_path / "run"
    fit(small, out, epochs=2, stop_after=1, device="cpu")
    small.train.num_workers = 1
    history = fit(small, None, resume=out, device="cpu")
    assert [row["epoch"] for row in history] == [0, 1]


def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, small, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    (tmp_path / "c.toml").write_text(to_toml(small))
    assert main(["--config", str(tmp_path / "c.toml"), "train", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / '.lock'} is a symbolic link" in err and err.count("\n") == 1, err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "a refused run wrote into the folder"


def test_a_run_started_in_the_folder_after_the_first_look_is_seen_under_the_lock(tmp_path, small):
    """Two trains into one new folder: the one that takes the lock second is refused, and never mixes its files in."""
    from linear_probe_small_cnn.config import ConfigError
    from linear_probe_small_cnn.data import DEFAULT_DATA
    from linear_probe_small_cnn.run import Asked, open_run, start_run

    out = tmp_path / "race"
    asked = Asked(out, DEFAULT_DATA, 1, None, None, (), "cpu", None, False)
    late = start_run(small, asked)  # looked while the folder was free
    fit(small, out, epochs=1, device="cpu")  # the other run, which took the lock first
    before = files_of(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        open_run(late, asked)
    assert files_of(out) == before


def test_resume_with_overwrite_is_refused_before_the_run_is_touched(tmp_path, small, capsys):
    out = tmp_path / "run"
    fit(small, out, epochs=2, stop_after=1, device="cpu")
    before = files_of(out)
    assert main(["train", "--resume", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "which --overwrite would delete first; pass one of them" in err and err.count("\n") == 1, err
    assert files_of(out) == before


@pytest.mark.parametrize("name", ["epoch-/../../../victim.txt", "../victim.txt", "/tmp/victim.txt", ".lock"])
def test_a_checkpoints_json_naming_a_path_is_refused_and_nothing_outside_is_deleted(tmp_path, small, capsys, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "a" / "run"
    small.checkpoint.keep_last_k = 1
    fit(small, out, epochs=3, stop_after=1, device="cpu")
    (out / "epoch-").mkdir()
    manifest = json.loads((out / "checkpoints.json").read_text())
    manifest["files"][name] = dict(manifest["files"]["last.ckpt"], epoch=0, format="state_dict")
    (out / "checkpoints.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"lists {name!r}, not a plain file name" in err and err.count("\n") == 1, err
    assert victim.read_text() == "precious\n"


def test_pruning_deletes_only_the_epoch_files_it_wrote(tmp_path):
    from linear_probe_small_cnn.saving import save_full

    files = RunFiles(tmp_path)
    other = {"epoch": 0, "format": "full"}
    for name in ("epoch-notes.txt", "epoch-0001.ckpt.bak"):
        files.save(name, b"the user's", other)
    checkpoint = {"epoch": 2, "history": [{"val_loss": 1.0, "val_acc": 0.5}]}
    save_full(files, checkpoint, keep_last_k=1)
    save_full(files, {**checkpoint, "epoch": 3}, keep_last_k=1)
    assert (tmp_path / "epoch-notes.txt").exists() and (tmp_path / "epoch-0001.ckpt.bak").exists()
    assert not (tmp_path / "epoch-0002.ckpt").exists() and (tmp_path / "epoch-0003.ckpt").exists()


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_a_device_this_project_cannot_train_on_is_one_line_before_the_folder_exists(tmp_path, capsys, device):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: this project trains on cpu, cuda or cuda:N" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_an_unknown_compile_backend_is_one_line_before_the_folder_exists(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--set", "train.compile=true", "--set", "train.compile_backend='bogus'"]
    assert main([*args, "train", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train.compile_backend = 'bogus': one of " in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("made", [True, False])
def test_a_run_that_fails_before_its_first_save_leaves_the_folder_as_it_found_it(tmp_path, small, monkeypatch, made):
    from linear_probe_small_cnn import train

    out = tmp_path / "run"
    if not made:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None

    def fails(run, epoch):
        raise RuntimeError("the first epoch fails")

    monkeypatch.setattr(train, "run_epoch", fails)
    with pytest.raises(RuntimeError, match="the first epoch fails"):
        fit(small, out, epochs=1, device="cpu")
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    monkeypatch.undo()
    fit(small, out, epochs=1, device="cpu")  # a plain retry, no --overwrite and nothing to --resume


def test_overwrite_removes_a_linked_store_and_not_what_it_points_to(tmp_path, small):
    out = tmp_path / "run"
    fit(small, out, epochs=1, device="cpu")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    fit(small, out, epochs=1, device="cpu", overwrite=True)
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert not (out / "tensorboard").is_symlink()


def test_an_out_that_is_a_file_or_under_one_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out, says in ((a_file, f"--out {a_file} is a file"), (a_file / "run", f"{a_file} is a file, so nothing")):
        assert main(["train", "--epochs", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert main(["evaluate", "--weights", "w.pt", "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
    assert a_file.read_text() == "mine"


def test_the_run_folder_config_repeats_the_run_bit_for_bit(tmp_path, small):
    """RUN/config.toml is the resolved config: --config RUN/config.toml trains the same weights again."""
    config_file = tmp_path / "small.toml"
    config_file.write_text(to_toml(small))
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--device", "cpu", "--epochs", "2"]
    assert main(["--config", str(config_file), "--set", "train.lr=0.02", "train", "--out", str(first), *common]) == 0
    resolved = load_config(first / "config.toml")
    assert resolved.train.lr == 0.02 and resolved.train.epochs == 2
    assert main(["--config", str(first / "config.toml"), "train", "--out", str(second), "--device", "cpu"]) == 0
    before, again = read_state_dict(first / "best.pt"), read_state_dict(second / "best.pt")
    assert before.keys() == again.keys() and all(torch.equal(before[k], again[k]) for k in before)


SIGTERM_RUN = textwrap.dedent(
    """
    import sys
    from linear_probe_small_cnn.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_sigterm_mid_run_stops_cleanly_and_the_run_resumes(tmp_path, small):
    """Killed at random points of the saves, several times: exit 143, one line, no temp file, a resumable run."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(small))
    out = tmp_path / "run"
    command = [sys.executable, "-c", SIGTERM_RUN, "--config", str(config_file), "train", "--epochs", "4"]
    subprocess.run([*command, "--out", str(out), "--stop-after", "1"], check=True, capture_output=True, env=child_env())
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [*command, "--resume", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
        )
        for line in proc.stdout:
            if line.startswith("epoch "):
                break  # the epoch's saves start now
        delay = float(torch.rand((), generator=generator)) * 0.3
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.terminate()
        _, err = proc.communicate(timeout=120)
        if proc.returncode == -signal.SIGTERM:
            # Only after the run is done, as the interpreter exits: nothing was left to stop.
            assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 3, err[-2000:]
            continue
        assert proc.returncode in (0, 143), err[-2000:]
        if proc.returncode == 143:
            assert err.strip().count("\\n") == 0 and "stopped" in err, err
        assert not list(out.glob(".*.tmp")), "a temp file survived the SIGTERM"
        files = RunFiles(out)
        for name in files.files:
            files.verify(name)
    assert main(["train", "--resume", str(out)]) == 0
    straight = tmp_path / "straight"
    fit(small, straight, epochs=4, device="cpu")
    resumed = torch.load(out / "last.ckpt", weights_only=True)["model"]
    expected = torch.load(straight / "last.ckpt", weights_only=True)["model"]
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


class UploadCutShort:
    """Trackers whose last upload a Ctrl-C interrupts, as a slow network lets a second Ctrl-C do."""

    def sync(self, history: list) -> None:
        pass

    def file(self, path: object) -> None:
        pass

    def close(self, files: object, failed: bool) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_during_the_trackers_last_upload_says_the_run_is_whole(tmp_path, small, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "open_trackers", lambda *args: UploadCutShort())
    (tmp_path / "c.toml").write_text(to_toml(small))
    out = tmp_path / "run"
    assert main(["--config", str(tmp_path / "c.toml"), "train", "--out", str(out), "--epochs", "1"]) == 130
    line = capsys.readouterr().err.strip()
    assert line.startswith("stopped after epoch 0, whose files are intact") and line.endswith("was cut short"), line
    monkeypatch.undo()
    # The lock went with the run: the folder takes a new one.
    assert main(["--config", str(tmp_path / "c.toml"), "train", "--out", str(out), "--epochs", "1", "--overwrite"]) == 0
