"""Loading is planned and loud, never runs code; saving is atomic and recorded."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from custom_char_model.checkpoint import (
    MANIFEST,
    CheckpointError,
    RunFiles,
    atomic_write,
    read_classes,
    read_state_dict,
    torch_load,
)
from custom_char_model.cli import main
from custom_char_model.config import Config, ConfigError, InitConfig, load_config
from custom_char_model.model import HEAD, build_model
from custom_char_model.train import fit
from custom_char_model.weights import load_init, plan_load


def init_config(config: Config, **overrides) -> InitConfig:
    """The packaged [init] section with some keys changed."""
    return replace(config.init, **overrides)


def test_partial_load_unwraps_strips_prefixes_and_reports_shape_mismatches(tmp_path, config):
    num_classes = config.model.num_classes
    wider = replace(config, model=replace(config.model, num_classes=num_classes + 1))
    source = build_model(wider).state_dict()
    # DDP inside torch.compile, inside a Lightning-style dict inside a "module" wrapper.
    wrapped = {"module": {"state_dict": {f"_orig_mod.module.{k}": v for k, v in source.items()}}}
    torch.save(wrapped, tmp_path / "w.pth")
    model = build_model(config)
    plan = load_init(model, tmp_path / "w.pth", init_config(config))
    assert {key for key, _, _ in plan.mismatched} == {f"{HEAD}.weight", f"{HEAD}.bias"}
    assert not plan.missing and not plan.unexpected
    state = model.state_dict()
    for key in plan.loaded:
        assert torch.equal(state[key], source[key]), key
    shape = list(source[f"{HEAD}.weight"].shape)
    assert f"{HEAD}.weight  file {shape} model {list(state[f'{HEAD}.weight'].shape)}" in plan.format()


def test_remap_renames_keys_before_matching(tmp_path, config):
    source = build_model(config).state_dict()
    torch.save({f"backbone.{k}": v for k, v in source.items()}, tmp_path / "w.bin")
    model = build_model(config)
    plain = plan_load(model, read_state_dict(tmp_path / "w.bin"), "w.bin", [], 0)
    assert not plain.loaded and len(plain.unexpected) == len(source)
    plan = load_init(model, tmp_path / "w.bin", init_config(config, remap=[["^backbone\\.", ""]]))
    assert plan.remapped == len(source) and plan.loaded == list(source)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_a_remap_that_merges_keys_or_does_not_compile_is_a_config_error(tmp_path, config):
    model = build_model(config)
    source = model.state_dict()
    with pytest.raises(ConfigError, match="maps two keys"):
        plan_load(model, source, "w", [["\\.(weight|bias)$", ""]], 0)
    path = tmp_path / "remap.toml"
    path.write_text('[init]\nremap = [["(", ""]]\n')
    with pytest.raises(ConfigError, match=r"init.remap = \['\(', ''\]: \[regex, replacement\] pairs"):
        load_config(path)


def test_first_n_counts_in_the_models_order_not_the_files(tmp_path, config):
    source = build_model(config).state_dict()
    # Written in reverse: "the first N keys of the file" would be the head.
    save_file({k: source[k].contiguous() for k in reversed(source)}, tmp_path / "w.safetensors")
    model = build_model(config)
    plan = load_init(model, tmp_path / "w.safetensors", init_config(config, first_n=4, min_loaded_fraction=0.0))
    assert plan.loaded == list(source)[:4]
    assert plan.beyond_first_n == list(source)[4:]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_init_refuses_integers_or_booleans_for_float_weights(tmp_path, config, capsys, dtype):
    model = build_model(config)
    source = model.state_dict()
    name = next(k for k, v in source.items() if v.is_floating_point())
    before = source[name].clone()
    source[name] = torch.ones_like(source[name], dtype=dtype)
    torch.save(source, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=f"1 tensors of .*w.pt cannot carry the model's float weights .*{name}"):
        load_init(model, tmp_path / "w.pt", init_config(config, min_loaded_fraction=0.0))
    assert torch.equal(model.state_dict()[name], before), "nothing loads from a refused file"
    row = rf"wrong dtype +{re.escape(name)}  file {re.escape(str(dtype))}, model torch\.float32"
    assert re.search(row, capsys.readouterr().out)
    assert main(["inspect-weights", str(tmp_path / "w.pt")]) == 2
    assert "train --init would refuse this file" in capsys.readouterr().out


def test_the_report_collapses_runs_of_keys_under_one_module(config):
    model = build_model(config)
    source = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD + ".")}
    plan = plan_load(model, source, "w", [], 0)
    # Each module that holds no part of the head collapses to one line: the
    # top-level children, and the head's siblings where the head is nested.
    head = HEAD.split(".")

    def module_of(key: str) -> str:
        parts = key.split(".")
        depth = next(i for i, (a, b) in enumerate(zip(parts, head, strict=False)) if a != b)
        return ".".join(parts[: depth + 1])

    expected = []
    for module in dict.fromkeys(module_of(k) for k in source):
        keys = [k for k in source if k == module or k.startswith(module + ".")]  # a ViT's cls_token is both
        expected.append(("loaded", f"{module}.* ({len(keys)} tensors)" if len(keys) > 1 else keys[0]))
    # The head's keys collapse under the highest module that holds nothing else
    # (a classifier that is only dropout and the head).
    keys = list(model.state_dict())
    holder = next(
        prefix
        for prefix in (".".join(head[: i + 1]) for i in range(len(head)))
        if all(k.startswith(HEAD + ".") for k in keys if k.startswith(prefix + "."))
    )
    expected.append(("missing in file", f"{holder}.* (2 tensors)"))
    assert plan.rows() == expected
    assert plan.format().splitlines()[-1].split() == ["missing", "in", "file", f"{holder}.*", "(2", "tensors)"]


def test_a_file_that_matches_too_little_is_refused_before_anything_loads(tmp_path, config):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    model = build_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="refusing to train from it"):
        load_init(model, tmp_path / "other.pt", init_config(config))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_inspect_weights_prints_the_plan_and_the_verdict(tmp_path, config, config_file, capsys):
    torch.save(build_model(config).state_dict(), tmp_path / "good.pt")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert main(["--config", str(config_file), "inspect-weights", str(tmp_path / "good.pt")]) == 0
    out = capsys.readouterr().out
    assert "(100%)" in out and "would accept" in out
    assert main(["--config", str(config_file), "inspect-weights", str(tmp_path / "other.pt")]) == 2
    out = capsys.readouterr().out
    assert re.search(r"not in model +encoder\.weight\n", out) and "would refuse" in out


def test_an_unknown_suffix_is_named(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match="unknown weights format '.h5'"):
        read_state_dict(tmp_path / "w.h5")


class RunsCode:
    """Pickles into a call of os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: loading it would run code from .*posix.system") as excinfo:
        torch_load(tmp_path / "evil.pt")
    assert not marker.exists()

    assert "weights_only" not in str(excinfo.value)  # never the advice that would run it


# Protocol 2 names a callable with GLOBAL, 4 with STACK_GLOBAL; torch warns that it expected 2, which is the point.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_legacy_pickle_that_runs_code_is_refused_without_the_unsafe_advice(tmp_path, protocol):
    marker = tmp_path / "pwned"
    with open(tmp_path / "old.pt", "wb") as f:
        pickle.dump({"state_dict": {}, "payload": RunsCode(marker)}, f, protocol=protocol)  # no zip: the pre-1.6 layout
    with pytest.raises(CheckpointError, match="refused: loading it would run code from .*system") as excinfo:
        torch_load(tmp_path / "old.pt")
    assert "weights_only" not in str(excinfo.value)
    assert not marker.exists()


@pytest.mark.parametrize("shape", ["[1, 2]", '{"files": [1]}', '{"files": {"best.pt": 5}}', '{"other": {}}'])
def test_a_checkpoints_json_of_the_wrong_shape_is_one_line(tmp_path, shape):
    (tmp_path / MANIFEST).write_text(shape)
    with pytest.raises(CheckpointError, match=r"checkpoints\.json is damaged: expected"):
        RunFiles(tmp_path)


def test_a_full_disk_is_one_line_and_the_file_it_would_replace_stays(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"the good file")

    def fills_the_disk(f) -> None:
        f.write(b"half of the new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match=r"could not write .*best\.pt: No space left on device; the file it"):
        atomic_write(path, fills_the_disk)
    assert path.read_bytes() == b"the good file"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left


def test_a_signal_just_after_the_temp_file_is_made_leaves_no_temp_file(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM raises KeyboardInterrupt at any bytecode, this one included."""
    path = tmp_path / "best.pt"
    path.write_bytes(b"the good file")
    real_open = os.open

    def signal_lands(name, flags, mode=0o777, **kwargs):
        fd = real_open(name, flags, mode, **kwargs)
        if str(name).endswith(".tmp"):
            raise KeyboardInterrupt  # the file exists; the caller has not seen its fd
        return fd

    monkeypatch.setattr(os, "open", signal_lands)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"the good file"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_train_on_a_full_disk_exits_2_with_one_line(tmp_path, config_file, monkeypatch, capsys):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # where a full disk shows: the data reaching it
    assert main(["--config", str(config_file), "train", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    # Nothing was saved: the folder the run made is gone, temp files and all.
    assert not [p for p in (tmp_path / "run").glob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["empty", "truncated", "zeroed", "random"])
def test_damaged_files_raise_one_typed_error_naming_the_file(tmp_path, config, damage):
    path = tmp_path / "model.pt"
    torch.save(build_model(config).state_dict(), path)
    data = path.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "zeroed":
        middle = len(data) // 2
        data = data[: middle - 512] + bytes(1024) + data[middle + 512 :]
    else:
        data = os.urandom(len(data))
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"model.pt \\({len(data)} bytes\\)"):
        read_state_dict(path)


def test_a_crash_mid_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda f: f.write(b"good"))

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [path], "a temp file was left behind"


def test_the_manifest_catches_a_changed_file_and_accepts_the_one_it_replaced(tmp_path):
    files = RunFiles(tmp_path)
    files.save("w.pt", b"first", {"epoch": 0, "format": "state_dict"})
    files.save("w.pt", b"second", {"epoch": 1, "format": "state_dict"})
    assert files.verify("w.pt")["epoch"] == 1
    assert "replaces" not in RunFiles(tmp_path).files["w.pt"]
    # What a run killed between recording the new hash and the rename leaves:
    files.files["w.pt"]["replaces"] = {"sha256": hashlib.sha256(b"first").hexdigest(), "epoch": 0}
    (tmp_path / "w.pt").write_bytes(b"first")
    assert files.verify("w.pt")["epoch"] == 0
    (tmp_path / "w.pt").write_bytes(b"flipped")
    with pytest.raises(CheckpointError, match="w.pt \\(7 bytes\\) does not match .*checkpoints.json"):
        files.verify("w.pt")


def test_a_new_file_recorded_but_never_renamed_is_forgotten_not_reported_missing(tmp_path, monkeypatch):
    files = RunFiles(tmp_path)
    files.save("last.ckpt", b"kept", {"epoch": 1, "format": "full"})
    real_replace = os.replace

    def killed_before_the_rename(src, dst):  # SIGTERM after the manifest lists the new file
        if Path(dst).name == "epoch-0002.ckpt":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        files.save("epoch-0002.ckpt", b"new", {"epoch": 2, "format": "full"})
    assert "epoch-0002.ckpt" in json.loads((tmp_path / "checkpoints.json").read_text())["files"]
    reloaded = RunFiles(tmp_path)
    assert list(reloaded.files) == ["last.ckpt"]
    assert reloaded.verify("last.ckpt")["epoch"] == 1


def test_every_file_a_run_writes_is_recorded_and_reloads_safely(tmp_path, config):
    out = tmp_path / "run"
    history = fit(config, out, epochs=2, device="cpu")
    manifest = json.loads((out / "checkpoints.json").read_text())["files"]
    # .lock is the run's lock (its holder's PID), not a result.
    records = {"checkpoints.json", "metrics.csv", "freeze_manifest.json", "config.toml", "classes.json", "data.json"}
    records.add(".lock")
    written = {p.name for p in out.iterdir()} - records
    assert written == set(manifest), "a file of the run folder is missing from checkpoints.json"
    # The resolved config, as a file --config reads back.
    assert load_config(out / "config.toml").to_dict() == config.to_dict()
    for name, entry in manifest.items():
        data = (out / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
        assert entry["torch"] == torch.__version__
        assert entry["format"] in {"state_dict", "safetensors", "full"}
        assert isinstance(entry["epoch"], int) and all(isinstance(v, float) for v in entry["metric"].values())
        if name.endswith(".safetensors"):
            state = read_state_dict(out / name)
        else:
            payload = torch_load(out / name)  # weights_only=True: plain data only
            state = read_state_dict(out / name)
            if entry["format"] == "full":
                assert isinstance(payload["config"], dict) and payload["config"] == config.to_dict()
                assert payload["history"] == history
                assert len(payload["rng"]) == 1, "one RNG state per process"
                assert payload["rng"][0]["numpy"]["bit_generator"] == "MT19937"
        assert state.keys() == build_model(config).state_dict().keys()
    with open(out / "metrics.csv") as f:
        assert [float(r["val_acc"]) for r in csv.DictReader(f)] == [r["val_acc"] for r in history]
    assert os.stat(out / "metrics.csv").st_mode & 0o044, "run files must be readable like any other file"


@pytest.mark.parametrize(("monitor", "mode"), [("val_loss", "min"), ("val_acc", "max")])
def test_best_follows_the_monitored_metric(tmp_path, config, monitor, mode):
    vars(config.checkpoint).update(monitor=monitor, mode=mode)
    out = tmp_path / "run"
    history = fit(config, out, epochs=3, device="cpu")
    values = [row[monitor] for row in history]
    best_epoch = values.index(min(values) if mode == "min" else max(values))
    name = "best.pt"
    entry = RunFiles(out).verify(name)
    assert entry["epoch"] == best_epoch and entry["metric"] == {monitor: values[best_epoch]}


def test_a_monitor_that_is_no_metric_is_refused_before_the_run_folder_exists(tmp_path, config):
    config.checkpoint.monitor = "val_accuracy"
    with pytest.raises(ConfigError, match="checkpoint.monitor = 'val_accuracy': must be \"val_acc\" or"):
        fit(config, tmp_path / "run", epochs=1, device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("metadata", "refusal"),
    [
        ({"tied": "{out.weight"}, "'tied' metadata is not JSON"),
        ({"tied": '{"out.weight": "missing.weight"}'}, "'tied' metadata must map names to tensors the file holds"),
        ({"tied": '["out.weight"]'}, "'tied' metadata must map names to tensors the file holds"),
        ({"classes": "[cat, dog"}, "'classes' metadata is not JSON"),
    ],
)
def test_safetensors_metadata_that_is_not_ours_is_one_line(tmp_path, metadata, refusal):
    path = tmp_path / "w.safetensors"
    save_file({"embed.weight": torch.zeros(10, 4)}, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=re.escape(refusal)):
        read_state_dict(path)
        read_classes(path)
