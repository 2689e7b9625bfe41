"""`traps`: every habit shows its failure, and this project's code shows none, on this model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_config

from teaching_small_cnn.cli import main
from teaching_small_cnn.model import HEAD, build_model
from teaching_small_cnn.traps import TRAPS, Row, misspelt, run_traps, trap_config
from teaching_small_cnn.weights import load_init


@pytest.fixture(scope="module")
def rows() -> dict[str, list[Row]]:
    """Every trap run once, its rows by trap name."""
    found: dict[str, list[Row]] = {}
    for row in run_traps(small_config()):
        found.setdefault(row.trap, []).append(row)
    return found


def test_every_trap_runs_and_each_one_shows(rows):
    assert list(rows) == list(TRAPS)
    assert all(row.shown for trap in rows.values() for row in trap)


def test_typo_freezes_fewer_silently_and_our_spec_names_the_real_name(rows):
    (row,) = rows["typo"]
    assert row.naive == 1  # one of the two listed names froze; the misspelt one trains on
    model = build_model(trap_config(small_config()))
    real = [name for name, _ in model.named_parameters()][1]
    assert isinstance(row.ours, str) and misspelt(real) in row.ours and real in row.ours.split("closest:")[1]


def test_zeroed_grads_move_frozen_weights_and_ours_stay_bit_identical(rows):
    held, moved = rows["zeroed_grads"]
    # The habit's optimizer holds every frozen tensor; ours none of them.
    names = [name for name, _ in build_model(trap_config(small_config())).named_parameters()]
    assert held.naive == sum(not name.startswith(HEAD + ".") for name in names) > 0
    assert held.ours == 0
    assert moved.naive > 0
    assert moved.ours == 0


def test_batchnorm_drifts_under_train_mode_and_ours_is_fixed(rows):
    stats, features = rows["batchnorm"]
    assert stats.naive > 0 and features.naive > 0
    assert stats.ours == 0 and features.ours == 0


def test_strict_false_loads_nothing_and_ours_strips_the_prefix_or_refuses(rows):
    prefixed, other = rows["strict_false"]
    assert prefixed.naive == 0 and other.naive == 0
    config = trap_config(small_config())
    assert prefixed.ours == len(build_model(config).state_dict())
    assert isinstance(other.ours, str) and "refusing to train from it" in other.ours


def test_a_module_prefixed_file_fills_every_tensor_through_init(tmp_path):
    config = trap_config(small_config())
    torch.manual_seed(1)
    source = build_model(config).state_dict()
    torch.save({"module." + name: tensor for name, tensor in source.items()}, tmp_path / "dp.pt")
    model = build_model(config)
    load_init(model, tmp_path / "dp.pt", config.init)
    assert all(torch.equal(tensor, source[name]) for name, tensor in model.state_dict().items())


def test_a_release_without_a_param_group_never_trains_and_our_stage_does(rows):
    (row,) = rows["unfreeze_without_group"]
    assert row.naive == 0
    assert row.ours > 0


def test_a_resume_without_schedule_and_rng_drifts_and_ours_is_bit_identical(rows):
    (row,) = rows["resume_without_state"]
    assert row.naive > 0
    assert row.ours == 0


def test_traps_json_is_a_list_of_measures(capsys):
    assert main(["traps", "--json", "--only", "typo"]) == 0
    (measure,) = json.loads(capsys.readouterr().out)
    assert set(measure) == {"trap", "measure", "naive", "ours", "unit"}
    assert measure["trap"] == "typo"


def test_traps_table_names_every_trap_and_its_verdict(capsys):
    assert main(["traps", "--only", "unfreeze_without_group"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["trap", "measure", "habit", "ours", "verdict"]
    assert table[1].startswith("unfreeze_without_group") and table[1].endswith("habit fails, ours holds")
