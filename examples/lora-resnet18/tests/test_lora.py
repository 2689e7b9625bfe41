"""freeze_by = lora: the base stays bit-identical, best.* is the merged model, the adapter file reloads it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fitted, shrink
from safetensors.torch import load_file, save_file

from lora_resnet18.checkpoint import CheckpointError, read_state_dict
from lora_resnet18.cli import main
from lora_resnet18.commands import trained_model
from lora_resnet18.config import ConfigError, LoraConfig, check
from lora_resnet18.data import example_inputs
from lora_resnet18.freeze import FreezeSpecError
from lora_resnet18.layers import freeze_summary
from lora_resnet18.lora import (
    ADAPTER_FILE,
    adapted,
    attach,
    load_adapter,
    merged_state_dict,
    scale_metadata,
    targets,
)
from lora_resnet18.model import HEAD, build_model
from lora_resnet18.rng import seed_everything
from lora_resnet18.run import prepare_model
from lora_resnet18.train import fit


@pytest.fixture
def config(config):
    shrink(config, 64, 32)  # two steps an epoch move the adapters, and keep a ViT-B short on a CPU
    return config


def built(config):
    """The model a run of `config` starts from: seeded as train seeds it."""
    seed_everything(config.train.seed)
    return prepare_model(config)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def is_adapter(key: str) -> bool:
    return ".lora_" in key


def test_the_default_target_adapts_modules_of_this_model_and_only_they_and_the_head_train(config):
    names = targets(build_model(config), config.lora.target)
    model, _ = prepare_model(config)
    assert adapted(model) == names
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if is_adapter(n) or n.startswith(HEAD + ".")}
    total = sum(p.numel() for p in model.parameters())
    share = sum(p.numel() for n, p in model.named_parameters() if n in trainable) / total
    assert f"({share:.1%})" in freeze_summary(model, prepare_model(config)[1])
    assert f"on {len(names)} modules" in freeze_summary(model, prepare_model(config)[1])


def test_training_leaves_the_base_bit_identical_and_the_batchnorm_as_its_mode_says(tmp_path, config, monkeypatch):
    before, state = built(config)
    start = {key: value.clone() for key, value in before.state_dict().items()}
    model, _ = fitted(config, tmp_path, "run", monkeypatch, epochs=1)
    after = model.state_dict()
    # BatchNorm in "train" mode updates its statistics; every other mode fixes them.
    training_bn = {name for name, mode in state.bn_modes.items() if mode == "train"}
    moved = []
    for key, value in start.items():
        if is_adapter(key) or key.startswith(HEAD + ".") or key.rpartition(".")[0] in training_bn:
            moved += [] if torch.equal(value, after[key]) else [key]
        else:
            assert torch.equal(value, after[key]), f"{key} changed: the base must stay as it was"
    assert any(".lora_B." in key for key in moved), "the adapters should have trained"
    assert any(key.startswith(HEAD + ".") for key in moved), "the head should have trained"


def test_best_files_are_the_merged_model_and_the_adapter_file_rebuilds_it(tmp_path, config, monkeypatch):
    model, _ = fitted(config, tmp_path, "run", monkeypatch, epochs=1)
    out = tmp_path / "run"
    x = example_inputs(config, 4)
    adapted_out = outputs(model, x)

    # A model built without peft loads best.pt, every key, and computes what the adapted model did.
    plain = build_model(config)
    plain.load_state_dict(read_state_dict(out / "best.pt"))
    torch.testing.assert_close(outputs(plain, x), adapted_out, rtol=1e-4, atol=1e-5)

    # A model built without peft loads best.safetensors, every key, and computes what the adapted model did.
    plain = build_model(config)
    plain.load_state_dict(read_state_dict(out / "best.safetensors"))
    torch.testing.assert_close(outputs(plain, x), adapted_out, rtol=1e-4, atol=1e-5)
    # The merged update matters: the trained head on the bare base computes something else.
    bare = build_model(config)
    base, _ = built(config)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD + ".")}
    bare.load_state_dict(merged_state_dict(base) | head)
    assert not torch.allclose(outputs(bare, x), adapted_out, atol=1e-4), "training should have moved the adapters"

    # The adapter file onto a fresh base: the same outputs, bit for bit.
    fresh, _ = built(config)
    load_adapter(fresh, out / ADAPTER_FILE)
    assert torch.equal(outputs(fresh, x), adapted_out)
    saved = load_file(out / ADAPTER_FILE)
    buffers = {name for name, _ in model.named_buffers()}
    assert all(is_adapter(k) or k.startswith(HEAD + ".") or k in buffers for k in saved), "adapters, head, buffers"
    assert buffers <= set(saved), "every buffer (BatchNorm statistics) is in the file"


@pytest.mark.cuda
def test_a_cuda_run_saves_the_merge_of_what_it_trained(tmp_path, config):
    fit(config, tmp_path / "run", epochs=1, device="cuda")
    fresh, _ = built(config)
    load_adapter(fresh, tmp_path / "run" / ADAPTER_FILE)
    plain = build_model(config)
    plain.load_state_dict(read_state_dict(tmp_path / "run" / "best.safetensors"))
    x = example_inputs(config, 4)
    torch.testing.assert_close(outputs(plain, x), outputs(fresh, x), rtol=1e-4, atol=1e-5)


def test_an_adapter_file_of_another_model_is_refused_in_one_line(tmp_path, config):
    model, _ = built(config)
    tensors = {k: v for k, v in model.state_dict().items() if is_adapter(k)}
    first = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != first}, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match=f"trainable tensors missing \\(first: {first}\\)"):
        load_adapter(model, tmp_path / "short.safetensors")
    save_file({**tensors, "no.such.key": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="keys this model lacks \\(first: no.such.key\\)"):
        load_adapter(model, tmp_path / "extra.safetensors")
    # The same tensors under another alpha would scale every update differently.
    other = {**scale_metadata(model), "lora_alpha": str(2 * config.lora.alpha)}
    save_file(tensors, tmp_path / "alpha.safetensors", metadata=other)
    with pytest.raises(CheckpointError, match="trained with lora_alpha = "):
        load_adapter(model, tmp_path / "alpha.safetensors")


def test_an_adapter_file_onto_another_base_is_refused_and_the_model_left_as_it_was(tmp_path, config, monkeypatch):
    fitted(config, tmp_path, "run", monkeypatch, epochs=1)
    # Every key and shape fits; only the base differs, as it does when the seed (or the --init file) is left out.
    seed_everything(config.train.seed + 1)
    other = prepare_model(config)[0]
    before = {key: tensor.clone() for key, tensor in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"trained on another base \(SHA-256 [0-9a-f]{12}\.\.\., this model's is"):
        load_adapter(other, tmp_path / "run" / ADAPTER_FILE)
    assert all(torch.equal(before[key], tensor) for key, tensor in other.state_dict().items())


def test_evaluate_reads_a_lora_runs_last_ckpt_merged(tmp_path, config, monkeypatch):
    model, _ = fitted(config, tmp_path, "run", monkeypatch, epochs=1)
    x = example_inputs(config, 4)
    plain = trained_model(str(tmp_path / "run" / "last.ckpt"), config)
    torch.testing.assert_close(outputs(plain, x), outputs(model, x), rtol=1e-4, atol=1e-5)


def test_merging_a_conv_or_linear_update_equals_the_adapted_forward(config):
    model, _ = built(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)  # B starts at zero: give the update something to merge
    x = example_inputs(config, 4)
    plain = build_model(config)
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(outputs(plain, x), outputs(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (["layer3x"], "matches no module or parameter"),
        (["fc"], "is the head, which trains in full"),
        (["fc.bias"], "no Linear, Conv or Embedding that LoRA can adapt"),
    ],
)
def test_a_target_that_cannot_be_adapted_is_one_line(config, target, message):
    config.lora.target = target
    with pytest.raises(FreezeSpecError, match=message):
        prepare_model(config)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("rank", 0, "at least 1"), ("alpha", float("nan"), "a finite number > 0"), ("dropout", 1.0, "in \\[0, 1\\)")],
)
def test_bad_lora_values_are_refused_before_anything_is_built(config, key, value, allowed):
    setattr(config.lora, key, value)
    with pytest.raises(ConfigError, match=f"lora.{key} = .*: {allowed}"):
        check(config)


def test_restore_best_is_refused_with_lora(config):
    config.unfreeze.stages = [{"epoch": 1, "select": "layer3", "restore_best": True}]
    with pytest.raises(ConfigError, match="restore_best = True: false with freeze_by = lora"):
        check(config)


def test_layers_marks_the_adapted_modules(config, config_file, capsys):
    assert main(["--config", str(config_file), "layers", "--json"]) == 0
    marked = [row["name"] for row in json.loads(capsys.readouterr().out)["modules"] if row["state"] == "lora"]
    model, _ = prepare_model(config)
    assert marked == adapted(model) and marked


def test_a_selector_that_adds_no_adaptable_module_is_refused_even_beside_one_that_does(config):
    config.lora.target = [*config.lora.target, "fc.bias"]
    with pytest.raises(FreezeSpecError, match="'fc.bias' holds no Linear, Conv or Embedding"):
        prepare_model(config)


class ReadsTheWeight(torch.nn.Module):
    """An attention-like parent that uses its child's weight without calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(4, 4)
        self.std = StandardisedConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)


class StandardisedConv(torch.nn.Conv2d):
    """A conv whose forward changes the weight first (as timm's StdConv2d does)."""

    def __init__(self) -> None:
        super().__init__(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight / self.weight.norm(), self.bias)


def test_an_adapter_the_forward_never_calls_is_refused(config):
    settings = LoraConfig(target=["qkv"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(FreezeSpecError, match="qkv .*never runs in the model's forward"):
        attach(ReadsTheWeight(), settings, torch.randn(2, 4))


def test_a_conv_with_a_forward_of_its_own_is_left_out(config):
    settings = LoraConfig(target=["std"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(FreezeSpecError, match="'std' holds no Linear, Conv or Embedding"):
        attach(ReadsTheWeight(), settings)


def test_the_head_trains_even_when_keep_trainable_leaves_it_out(config):
    config.freeze.keep_trainable = []
    model, _ = prepare_model(config)
    assert all(p.requires_grad for p in model.get_submodule(HEAD).parameters())


def test_a_lora_runs_own_files_are_refused_as_init(tmp_path, config):
    model, _ = built(config)
    torch.save(model.state_dict(), tmp_path / "adapted.pt")
    with pytest.raises(CheckpointError, match="holds LoRA tensors .*pass the run's best.pt or best.safetensors"):
        prepare_model(config, init=tmp_path / "adapted.pt")
