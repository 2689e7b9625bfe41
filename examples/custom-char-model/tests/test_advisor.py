"""plan and suggest: figures that agree with `layers`, specs that train accepts, and nothing changed or written."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import pretrained_like, shrink, small_config, to_toml

from custom_char_model import advisor
from custom_char_model.cli import main
from custom_char_model.data import DEFAULT_DATA, make_datasets
from custom_char_model.model import HEAD, build_model
from custom_char_model.run import pick_device, prepare_model


def cli(config_file: Path, *args: str) -> list[str]:
    return ["--config", str(config_file), *args]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """plan and suggest (--json) run once for the module, in an empty folder: their answers, and what they left."""
    folder = tmp_path_factory.mktemp("advisor")
    config_file = folder / "config.toml"
    config = small_config()
    shrink(config, 64, 32)  # a short epoch for each command the slow test pastes
    config_file.write_text(to_toml(config))
    before = sorted(folder.rglob("*"))
    answers = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for args in (["plan", "--batches", "1"], ["suggest", "--batches", "2", "--top", "2"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert main(cli(config_file, *args, "--json")) == 0
            answers.append(json.loads(out.getvalue()))
    left = sorted(folder.rglob("*")) == before
    return {"config_file": config_file, "rows": answers[0], "suggest": answers[1], "left": left}


def spec_of(overrides: list[str]) -> list[str] | None:
    """The selectors a row's --set puts in freeze.names, as `layers --spec` reads them (None: none set)."""
    for value in overrides:
        if value.startswith(advisor.SPEC_KEY + "="):
            selectors = json.loads(value.partition("=")[2])
            return selectors
    return None


def frozen_by_layers(config_file: Path, overrides: list[str], capsys: pytest.CaptureFixture) -> int:
    """The parameters `layers --spec` says the spec these --set values give freezes, under the same config."""
    selectors = spec_of(overrides)
    if not selectors:
        return 0
    settings = [part for value in overrides for part in ("--set", value)]
    assert main(["--config", str(config_file), *settings, "layers", "--spec", ", ".join(selectors)]) == 0
    together = re.search(r"together: \d+ tensors, ([\d,]+) of", capsys.readouterr().out)
    return int(together.group(1).replace(",", ""))


def test_each_row_trains_what_layers_says_its_spec_leaves_trainable(ran, capsys):
    rows, config_file = ran["rows"], ran["config_file"]
    names = [row["choice"] for row in rows]
    assert names[0] == "linear probe" and "full fine-tune" in names and names[-1].startswith("config")
    for row in rows:
        if spec_of(row["overrides"]) is None:
            continue
        frozen = frozen_by_layers(config_file, row["overrides"], capsys)
        assert row["trainable"] == row["total"] - frozen, row["choice"]
    probe = rows[0]
    head = sum(p.numel() for p in build_model(load(config_file)).get_submodule(HEAD).parameters())
    assert probe["trainable"] == head


def test_what_trains_and_what_it_costs_grow_together_from_the_probe_to_the_full_fine_tune(ran):
    rows = ran["rows"]
    ladder = rows[: [row["choice"] for row in rows].index("full fine-tune") + 1]
    for smaller, larger in zip(ladder, ladder[1:], strict=False):
        assert smaller["trainable"] < larger["trainable"], (smaller["choice"], larger["choice"])
        assert smaller["optimizer_bytes"] < larger["optimizer_bytes"]
        assert smaller["memory_bytes"] < larger["memory_bytes"]
    # AdamW keeps two moments per trainable float: its state is what the row trains, twice.
    for row in ladder:
        assert row["optimizer_bytes"] >= 2 * 4 * row["trainable"]
    assert all(row["step_seconds"] > 0 for row in rows)


def load(config_file: Path):
    from custom_char_model.config import load_config

    return load_config(config_file)


def test_each_choice_comes_with_its_train_command_and_nothing_is_written(ran):
    for row in ran["rows"]:
        assert (row["command"] is None) == (not row["overrides"]), row["choice"]
        if row["overrides"]:
            assert shlex.split(row["command"])[:3] == ["custom_char_model", "--config", str(ran["config_file"])]
            assert all(shlex.quote(value) in row["command"] for value in row["overrides"])
    assert ran["left"], "plan or suggest wrote into the folder they ran in"


def printed_commands(printed: str) -> list[str]:
    return [line.strip() for line in printed.splitlines() if line.strip().startswith("custom_char_model ")]


@pytest.mark.slow
def test_every_printed_command_trains(ran, tmp_path, capsys):
    """The commands plan's and suggest's tables print, pasted (RUN replaced, a short epoch), train what a row says."""
    rows = [row for row in ran["rows"] if row["overrides"]]
    assert main(cli(ran["config_file"], "plan", "--batches", "1")) == 0
    assert main(cli(ran["config_file"], "suggest", "--batches", "1")) == 0
    commands = printed_commands(capsys.readouterr().out)
    assert len(commands) == len(rows) + 1
    for i, command in enumerate(commands):
        argv = shlex.split(command)[1:]
        argv[argv.index("RUN")] = str(tmp_path / f"run{i}")
        assert main([*argv, "--epochs", "1"]) == 0, command
        with open(tmp_path / f"run{i}" / "metrics.csv") as file:
            trained = int(float(next(csv.DictReader(file))["trainable_params"]))
        if i < len(rows):
            assert trained == rows[i]["trainable"], command


def test_the_model_and_every_random_generator_are_left_as_they_were(config):
    model, _ = prepare_model(config)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    batches = advisor.training_batches(DEFAULT_DATA, config, 1)
    random.seed(3)
    torch.manual_seed(3)
    python, generator = random.getstate(), torch.get_rng_state()
    advisor.measure(model, config, batches, pick_device("cpu"))
    advisor.gradient_ratios(model, advisor.units(model), batches.first(), pick_device("cpu"))
    assert random.getstate() == python and torch.equal(torch.get_rng_state(), generator)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())


def test_suggest_ranks_every_block_but_the_head_and_its_spec_trains_the_top_ones_and_the_head(ran, capsys):
    config_file, answer = ran["config_file"], ran["suggest"]
    config = load(config_file)
    parts = advisor.units(build_model(config))
    ranked = [entry["block"] for entry in answer["ranking"]]
    assert sorted(ranked) == sorted(label for label, _ in parts[:-1])
    scores = [entry["ratio"] for entry in answer["ranking"]]
    assert scores == sorted(scores, reverse=True) and all(score > 0 for score in scores)
    chosen = {label: names for label, names in parts if label in ranked[:2] or label == parts[-1][0]}
    trains = sum(p.numel() for n, p in build_model(config).named_parameters() if any(n in s for s in chosen.values()))
    frozen = frozen_by_layers(config_file, answer["set"], capsys)
    total = sum(p.numel() for p in build_model(config).parameters())
    assert total - frozen == trains
    # The same data and weights give the same ranking.
    assert main(cli(config_file, "suggest", "--batches", "2", "--top", "2", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["ranking"] == answer["ranking"]


def test_with_init_the_load_report_goes_to_stderr_and_json_stays_json(config_file, tmp_path, capsys):
    weights = tmp_path / "pretrained.pt"
    pretrained_like(weights, load(config_file))
    for command in (["plan", "--batches", "1"], ["suggest", "--batches", "1"]):
        assert main(cli(config_file, *command, "--init", str(weights), "--json")) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)
        assert captured.err.count(f"weights {weights}: ") == 1, captured.err  # once, not once per row


@pytest.mark.parametrize("args", [["--batches", "0"], ["--batches", "100000"], ["--top", "0"], ["--top", "999"]])
def test_a_bad_count_is_one_line(config_file, capsys, args):
    command = "suggest" if args[0] == "--top" else "plan"
    assert main(cli(config_file, command, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and args[0] in err and "Traceback" not in err


def test_too_few_images_for_the_batches_asked_is_one_line(config_file, capsys):
    train_set, _ = make_datasets(DEFAULT_DATA, load(config_file))
    batches = len(train_set) // load(config_file).train.batch_size + 1
    assert main(cli(config_file, "plan", "--batches", str(batches))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{len(train_set)} training images" in err and "--batches" in err
