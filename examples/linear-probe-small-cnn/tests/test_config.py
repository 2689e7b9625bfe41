"""The typed config: a typo names the closest key, and every bad value is one line before anything is written."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import child_env

from linear_probe_small_cnn.cli import get_args_parser, main
from linear_probe_small_cnn.config import ConfigError, load_config
from linear_probe_small_cnn.train import fit

# (TOML under its section, what the one line must say)
BAD_VALUES = [
    ("[model]\nnum_classes = 1", "model.num_classes = 1: a classifier needs at least 2 classes"),
    ("[train]\nepochs = 0", "train.epochs = 0: at least 1"),
    ("[train]\nepochs = -3", "train.epochs = -3: at least 1"),
    ("[train]\nbatch_size = 0", "train.batch_size = 0: at least 1"),
    ("[train]\nlr = 0", "train.lr = 0.0: a finite number > 0"),
    ("[train]\nlr = -0.1", "train.lr = -0.1: a finite number > 0"),
    ("[train]\nlr = nan", "train.lr = nan: a finite number > 0"),
    ("[train]\nlr = inf", "train.lr = inf: a finite number > 0"),
    ('[train]\nlr = "fast"', "train.lr = 'fast': must be a number"),
    ("[train]\nweight_decay = -1", "train.weight_decay = -1.0: a finite number >= 0"),
    ("[train]\nepochs = true", "train.epochs = True: must be an integer"),
    ("[train]\nnum_workers = -1", 'train.num_workers = -1: "auto" or >= 0'),
    ("[train]\nseed = -1", "train.seed = -1: a whole number in [0, "),
    ("[train]\nseed = 4294967296", "train.seed = 4294967296: a whole number in [0, "),
    ("[train]\nseed = 9223372036854775807", "train.seed = 9223372036854775807: a whole number in [0, "),
    ("[model]\nnum_classes = 100000000000", "model.num_classes = 100000000000: at most 1,000,000"),
    ("[train]\nimage_size = 0", "train.image_size = 0: at least 1 pixel"),
    ("[data]\nsynthetic_train_size = 0", "data.synthetic_train_size = 0: at least 1"),
    ("[data]\nsynthetic_train_size = 100000000000", "data.synthetic_train_size = 100000000000: at most 10,000,000"),
    ("[train]\nimage_size = 1000000", "train.image_size = 1000000: at most 8192"),
    ('[data]\nbad_images = "ignore"', 'data.bad_images = \'ignore\': must be "error" or "skip"'),
    ("[init]\nmin_loaded_fraction = 2", "init.min_loaded_fraction = 2.0: in [0, 1]"),
    ("[checkpoint]\nkeep_last_k = -1", "checkpoint.keep_last_k = -1: 0 (last.ckpt only) or more"),
    ('[checkpoint]\nmode = "up"', 'checkpoint.mode = \'up\': must be "max" or "min"'),
    ("[train]\nlayer_decay = 0", "train.layer_decay = 0.0: a number in (0, 1]; 1.0 is off"),
    ('[train]\nlr_mult = { "head" = -1 }', "train.lr_mult 'head' = -1: a multiplier > 0"),
]


@pytest.mark.parametrize(("toml", "message"), BAD_VALUES, ids=[toml.split("\n")[1] for toml, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_and_nothing_is_written(tmp_path, capsys, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    out = tmp_path / "run"
    assert main(["--config", str(path), "train", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_typo_in_a_key_names_the_closest_one(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[train]\nbatch_sise = 8\n")
    with pytest.raises(ConfigError, match="unknown key train.batch_sise; did you mean batch_size"):
        load_config(path)
    path.write_text("[trian]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; did you mean train"):
        load_config(path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml is not UTF-8 text"):
        load_config(path)


def test_a_config_changed_in_code_is_checked_too(tmp_path, config):
    config.train.lr = float("inf")
    with pytest.raises(ConfigError, match="train.lr = inf: a finite number > 0"):
        fit(config, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_reads_as_typed_sections(config):
    assert isinstance(config.train.lr, float) and isinstance(config.train.epochs, int)
    assert config.to_dict()["train"]["lr"] == config.train.lr


def test_set_takes_toml_values_over_the_config_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[train]\nlr = 0.1\nseed = 3\n")
    overrides = ["train.lr=3e-4", 'freeze.keep_trainable=["head"]', "train.num_workers=auto", "train.seed=7"]
    config = load_config(path, overrides)
    assert config.train.lr == 3e-4 and config.train.seed == 7
    assert config.freeze.keep_trainable == ["head"]
    # Not a TOML value: taken as the string it spells.
    assert config.train.num_workers == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.lr=1", "--set trian.lr=1: unknown section [trian]; did you mean train?"),
        ("train.batch_sise=8", "--set train.batch_sise=8: unknown key train.batch_sise; did you mean batch_size"),
        ("train.lr=fast", "train.lr = 'fast': must be a number"),
        ("train.lr", "--set 'train.lr': expected section.key=value, e.g. --set train.lr=3e-4"),
    ],
)
def test_a_bad_set_is_one_line_and_nothing_is_written(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["--set", override, "train", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_a_section_that_is_not_a_table_says_so(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("model = 5\n")
    assert main(["--config", str(tmp_path / "c.toml"), "layers"]) == 2
    err = capsys.readouterr().err
    assert "model = 5: [model] must be a table of keys" in err and err.count("\n") == 1, err


def test_a_config_that_is_a_folder_or_nests_too_deeply_is_one_line(tmp_path, capsys):
    assert main(["--config", str(tmp_path), "layers"]) == 2
    err = capsys.readouterr().err
    assert f"--config {tmp_path}: cannot be read" in err and err.count("\n") == 1, err
    assert main(["--set", "train.lr=" + "[" * 3000 + "]" * 3000, "layers"]) == 2
    err = capsys.readouterr().err
    assert "nests too deeply" in err and err.count("\n") == 1, err


def test_help_and_a_mistyped_flag_answer_without_importing_torch():
    """Parsing imports no torch (about 2 s), so every --help and a flag's typo answer at once."""
    (sub,) = [action for action in get_args_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    asked = [["--help"], *([name, "--help"] for name in sub.choices), ["train", "--out", "RUN", "--epocs", "1"]]
    probe = (
        "import sys\n"
        "from linear_probe_small_cnn.cli import main\n"
        f"for argv in {asked!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "torch imported: False"
    assert "unrecognized arguments: --epocs 1" in done.stderr
