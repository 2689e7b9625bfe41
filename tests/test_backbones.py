"""Every backbone, rendered with every kind of freeze_by, trains an epoch on CPU and leaves frozen tensors alone.

Each render is imported in this process (its package name is unique), built
from weights the test saves itself (nothing is downloaded), and trained for
one epoch on a tiny synthetic set at the smallest input the model takes.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import timm
import torch

from scaffold.matrix import DIMENSIONS
from scaffold.render import backbone_facts, render
from tests.backbone_table import readme_table, table
from tests.conftest import ROOT, import_rendered

# Every backbone value; the answers beyond `backbone`: timm trains its smallest ViT.
BACKBONES = DIMENSIONS["backbone"]
EXTRA_ANSWERS: dict[str, dict] = {"timm": {"timm_model": "vit_tiny_patch16_224"}}
FREEZE_BY = ["backbone", "name", "index", "pattern"]


def tiny_config(project: Path, package: str) -> dict:
    config = import_rendered(project, package, "config").load_config()
    vars(config.train).update(epochs=1, batch_size=8, num_workers=0)
    if hasattr(config.train, "image_size"):
        config.train.image_size = 32
    if hasattr(config.data, "synthetic_train_size"):
        vars(config.data).update(synthetic_train_size=16, synthetic_val_size=8)
    if hasattr(config.model, "pretrained"):
        config.model.pretrained = False
    return config


@pytest.fixture(scope="module")
def init_files(tmp_path_factory) -> dict[str, Path]:
    """One weights file per backbone, shared by its four renders (the model does not depend on freeze_by)."""
    return {"dir": tmp_path_factory.mktemp("init")}


def init_weights(init_files: dict[str, Path], backbone: str, build) -> dict[str, torch.Tensor]:
    """The backbone's shared weights file (a seeded `build()`'s, made on first use), loaded."""
    if backbone not in init_files:
        torch.manual_seed(0)
        init_files[backbone] = init_files["dir"] / f"{backbone}.pt"
        torch.save(build().state_dict(), init_files[backbone])
    return torch.load(init_files[backbone], weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("freeze_by", FREEZE_BY)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_trains_an_epoch_with_each_freeze_kind(tmp_path, init_files, backbone, freeze_by):
    package = f"bb_{backbone}_{freeze_by}"
    answers = {"project_name": package, "backbone": backbone, "freeze_by": freeze_by, **EXTRA_ANSWERS.get(backbone, {})}
    project = render(tmp_path / package, {**answers, "checkpoint_formats": ["state_dict"]}, src=ROOT)
    config = tiny_config(project, package)
    model_module = import_rendered(project, package, "model")
    init = init_weights(init_files, backbone, lambda: model_module.build_model(config))
    if backbone not in EXTRA_ANSWERS:  # the facts copier.yml holds (and the matrix reads) are the model's
        assert backbone_facts(backbone)["has_bn"] == any(key.endswith(".running_mean") for key in init)

    out = tmp_path / "run"
    import_rendered(project, package, "train").fit(config, out, epochs=1, init=init_files[backbone], device="cpu")

    manifest = json.loads((out / "freeze_manifest.json").read_text())
    best = torch.load(out / "best.pt", weights_only=True)
    assert manifest["frozen"], "the default spec froze nothing"
    for key in manifest["frozen"]:
        assert torch.equal(best[key], init[key]), f"{key} is frozen but moved"
    for layer, mode in manifest["bn_modes"].items():
        if mode != "train":
            for stat in ("running_mean", "running_var"):
                assert torch.equal(best[f"{layer}.{stat}"], init[f"{layer}.{stat}"]), f"{layer}.{stat} moved"
    if freeze_by == "backbone" and backbone not in ("timm", "custom"):
        # copier.yml's head_width, which sets the probe's lr, is the real head's width.
        width = init[f"{model_module.HEAD}.weight"].shape[1]  # a Linear's weight is (out, in)
        assert config.train.lr == float(f"{0.01 * min(1, 512 / width):.2g}"), (width, config.train.lr)
    head = [key for key in init if key.startswith(model_module.HEAD + ".")]
    assert head and any(not torch.equal(best[key], init[key]) for key in head), "the head did not train"
    if backbone == "custom" and freeze_by == "name":
        # The shipped character model: the seeds' "freeze fc1" recipe, and fc3 with it.
        assert sorted(manifest["frozen"]) == ["fc1.bias", "fc1.weight", "fc3.bias", "fc3.weight"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("epoch,train_loss")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_trains_lora_adapters_and_best_pt_is_the_merged_model(tmp_path, init_files, backbone):
    """freeze_by=lora with the backbone's default target: the base stays bit-identical, best.pt is the merge."""
    package = f"lora_{backbone}"
    answers = {"project_name": package, "backbone": backbone, "freeze_by": "lora", **EXTRA_ANSWERS.get(backbone, {})}
    project = render(tmp_path / package, {**answers, "checkpoint_formats": ["state_dict"]}, src=ROOT)
    config = tiny_config(project, package)
    model_module, lora = import_rendered(project, package, "model"), import_rendered(project, package, "lora")
    run = import_rendered(project, package, "run")
    init = init_weights(init_files, backbone, lambda: model_module.build_model(config))
    out = tmp_path / "run"
    import_rendered(project, package, "train").fit(config, out, epochs=1, init=init_files[backbone], device="cpu")

    adapted, state = run.prepare_model(config, init=init_files[backbone])
    names = lora.adapted(adapted)
    assert names, "the default target adapted nothing"
    lora.load_adapter(adapted, out / lora.ADAPTER_FILE)
    best = torch.load(out / "best.pt", weights_only=True)
    merged = {f"{name}.weight" for name in names}
    head = model_module.HEAD + "."
    training_bn = {f"{layer}.{stat}" for layer, mode in state.bn_modes.items() if mode == "train" for stat in STATS}
    for key, value in init.items():
        if key not in merged and not key.startswith(head) and key not in training_bn:
            assert torch.equal(best[key], value), f"{key} is frozen but moved"
    # Some updates can stay zero after two steps (a squeeze-excitation gate saturated at random init
    # passes no gradient), but not all of them.
    assert any(not torch.equal(best[key], init[key]) for key in merged), "no adapter's update is in best.pt"
    # A model built without peft, from best.pt, computes what the adapted model does.
    plain = model_module.build_model(config)
    plain.load_state_dict(best)
    x = import_rendered(project, package, "data").example_inputs(config, 2)
    adapted.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted(x), rtol=1e-4, atol=1e-4)


STATS = ("running_mean", "running_var", "num_batches_tracked")


# One model of each family the timm defaults know, smallest first.
TIMM_FAMILIES = ["vit_small_patch16_224", "resnet10t", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050"]


@pytest.mark.parametrize("timm_model", TIMM_FAMILIES)
def test_timm_defaults_resolve_on_every_family(tmp_path, timm_model):
    head = timm.get_pretrained_cfg(timm_model).classifier
    for freeze_by in ("name", "index", "pattern", "lora"):
        package = f"timm_{freeze_by}_{timm_model}"
        answers = {"project_name": package, "backbone": "timm", "timm_model": timm_model, "freeze_by": freeze_by}
        project = render(tmp_path / package, answers, src=ROOT)
        assert f'HEAD = "{head}"' in (project / "src" / package / "model.py").read_text()
        config = tiny_config(project, package)
        prepared, state = import_rendered(project, package, "run").prepare_model(config)
        assert state.frozen and any(p.requires_grad for p in prepared.get_submodule(head).parameters())


def test_the_readme_backbone_table_matches_the_generated_code():
    assert readme_table((ROOT / "docs" / "backbones.md").read_text()) == table(), "run `python -m tests.backbone_table`"


def shown_selectors(project: Path) -> dict[str, list]:
    """Every example selector a render's config.toml, README, docs/ and --help show, by where it stands."""
    package = next(p for p in (project / "src").iterdir() if (p / "config.toml").is_file())
    pages = [package / "config.toml", project / "README.md", *sorted((project / "docs").glob("*.md"))]
    texts = "".join(path.read_text() for path in [*pages, package / "cli.py"])
    found: dict[str, list] = {"spec": [], "select": [], "bn_modes": [], "lr_mult": []}
    specs = re.findall(r"""--spec ["']([^"'{]+)["']""", texts) + re.findall(r'^SPEC_EXAMPLE = "(.+)"', texts, re.M)
    for spec in specs:
        found["spec"] += [s.strip() for s in spec.split(",")]
    found["select"] = re.findall(r'^#?\s*select = "([^"]+)"', texts, flags=re.M)
    for key in ("bn_modes", "lr_mult"):
        for inline in re.findall(key + r" = (\{[^}\n]+\})", texts):
            found[key].append(tomllib.loads(f"t = {inline}")["t"])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_selector_a_render_shows_resolves_on_its_model(tmp_path, backbone):
    """An example copied from a comment or the README must work: it names modules of this model."""
    package = f"ex_{backbone}"
    answers = {"project_name": package, "backbone": backbone, **EXTRA_ANSWERS.get(backbone, {})}
    project = render(tmp_path / package, answers, src=ROOT)
    config = tiny_config(project, package)
    run, freeze = import_rendered(project, package, "run"), import_rendered(project, package, "freeze")
    model = import_rendered(project, package, "model").build_model(config)
    shown = shown_selectors(project)
    assert shown["spec"] and shown["select"] and shown["lr_mult"], shown
    for selector in shown["spec"] + shown["select"]:
        freeze.resolve(model, [selector], f"example {selector!r}")
    for key, section in (("bn_modes", "freeze"), ("lr_mult", "train")):
        for inline in shown[key]:
            setattr(getattr(config, section), key, inline)
            run.prepare_model(config)
        setattr(getattr(config, section), key, {})


# traps.py reads a backbone only through its head, its children and whether it has BatchNorm: resnet50 and
# vgg16_bn are torchvision BatchNorm convnets as resnet18 is, and cost 2.8 of this test's 5 minutes (vgg16_bn's 138M
# parameters are copied and saved by every trap); every other family is here.
TRAP_BACKBONES = [b for b in BACKBONES if b not in ("resnet50", "vgg16_bn")]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", TRAP_BACKBONES)
def test_every_trap_shows_on_every_backbone_family(tmp_path, backbone):
    """A research render's `traps`: each habit fails on this model and the project's code holds."""
    package = f"traps_{backbone}"
    answers = {"project_name": package, "backbone": backbone, "features": ["traps"], **EXTRA_ANSWERS.get(backbone, {})}
    project = render(tmp_path / package, {**answers, "checkpoint_formats": ["state_dict", "full"]}, src=ROOT)
    config = import_rendered(project, package, "config").load_config()
    rows = import_rendered(project, package, "traps").run_traps(config)
    expected = ["typo", "zeroed_grads", "strict_false", "unfreeze_without_group", "resume_without_state"]
    if backbone_facts(backbone)["has_bn"]:
        expected.insert(2, "batchnorm")
    assert list(dict.fromkeys(row.trap for row in rows)) == expected
    for row in rows:
        if isinstance(row.naive, float):
            # A drift the habit leaves (or, for the release, the training it never gets), and none of ours.
            drift, still = (row.ours, row.naive) if row.trap == "unfreeze_without_group" else (row.naive, row.ours)
            assert drift > 0 and still == 0, (row.trap, row.measure, row.naive, row.ours)
        else:
            assert row.shown, row
