"""One meaning, two editions: a single table of cases, run against a teaching and a research render.

Each row says what a freeze spec, a BatchNorm policy or a weights file must
do to a model, with no reference to either edition's code. A small adapter per
edition turns a row into calls of that edition's own functions (teaching:
freeze.apply_freeze and checkpoint.load_matching; research: freeze.freeze and
weights.load_init), and every test asserts the same behaviour of both: which
tensors end up frozen, which BatchNorm buffers a training step moves, which
keys load. Only the selector grammar both editions share is used (names,
child indices, globs, "re:", a leading "!").

The teaching edition reads bn_policy from its config; the research edition
bakes it in at render time, so the research side renders once per policy a
row asks for (every policy on small_cnn, the default one on resnet18).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from scaffold.render import render
from tests.conftest import ROOT, import_rendered

BACKBONES = ("small_cnn", "resnet18")
HEADS = {"small_cnn": "head", "resnet18": "fc"}
DEFAULT_POLICY = "eval_frozen"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------
# The table. Parameter and layer sets are written as module prefixes:
# "block1" stands for every tensor under block1.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectorCase:
    """`selectors` as the frozen spec (bn_policy eval_frozen) freezes exactly the parameters under `freezes`."""

    backbone: str
    proves: str
    selectors: list
    freezes: tuple[str, ...] = ()
    refused_naming: str | None = None  # or: both refuse the spec with this closest real name in the message
    differs: str | None = None  # a measured disagreement between the editions: the row is a strict xfail


@dataclass(frozen=True)
class BatchNormCase:
    """With `spec` frozen under `policy`, one step in model.train() leaves `fixed` BatchNorm buffers alone."""

    backbone: str
    policy: str
    spec: list
    fixed: tuple[str, ...]
    moving: tuple[str, ...]
    differs: str | None = None


@dataclass(frozen=True)
class LoadCase:
    """A file `write` makes from the reference weights loads every key but `not_loaded`; `wrong_shape` is reported."""

    proves: str
    write: Callable[[dict[str, torch.Tensor], str, Path], Path]
    not_loaded: tuple[str, ...] = ()
    wrong_shape: tuple[str, ...] = ()
    refused: bool = False  # or: both refuse the file and leave the model as built
    differs: str | None = None


def prefixed(prefix: str) -> Callable[[dict[str, torch.Tensor], str, Path], Path]:
    def write(reference: dict[str, torch.Tensor], head: str, folder: Path) -> Path:
        torch.save({prefix + key: value for key, value in reference.items()}, folder / "prefixed.pt")
        return folder / "prefixed.pt"

    return write


def with_a_five_class_head(reference: dict[str, torch.Tensor], head: str, folder: Path) -> Path:
    weights = dict(reference)
    weights[f"{head}.weight"] = torch.randn(5, reference[f"{head}.weight"].shape[1])
    weights[f"{head}.bias"] = torch.randn(5)
    torch.save(weights, folder / "five_classes.pt")
    return folder / "five_classes.pt"


def wrapped(key: str) -> Callable[[dict[str, torch.Tensor], str, Path], Path]:
    def write(reference: dict[str, torch.Tensor], head: str, folder: Path) -> Path:
        torch.save({key: reference, "epoch": torch.tensor(3)}, folder / "wrapped.pt")
        return folder / "wrapped.pt"

    return write


def as_safetensors(reference: dict[str, torch.Tensor], head: str, folder: Path) -> Path:
    save_file({key: value.contiguous() for key, value in reference.items()}, str(folder / "weights.safetensors"))
    return folder / "weights.safetensors"


def only_the_head(reference: dict[str, torch.Tensor], head: str, folder: Path) -> Path:
    torch.save({key: value for key, value in reference.items() if key.startswith(f"{head}.")}, folder / "head.pt")
    return folder / "head.pt"


SMALL_CNN_BODY = ("stem", "block1", "block2")
RESNET18_BODY = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

CASES = [
    # Selectors on small_cnn: children 0=stem 1=block1 2=block2 3=pool (no parameters) 4=head.
    SelectorCase("small_cnn", "a module name", ["block1"], ("block1",)),
    SelectorCase("small_cnn", "a child index", [1], ("block1",)),
    SelectorCase("small_cnn", "a negative idx", ["idx:-3"], ("block2",)),
    SelectorCase("small_cnn", "a child without parameters adds nothing", ["idx:-2", "idx:-1"], ("head",)),
    SelectorCase("small_cnn", "an idx range is python's a:b", ["idx:0..2"], ("stem", "block1")),
    SelectorCase("small_cnn", "a glob", ["block[12].*"], ("block1", "block2")),
    SelectorCase("small_cnn", "a regex", ["re:^stem\\."], ("stem",)),
    SelectorCase("small_cnn", "a leading negation starts from everything", ["!head"], SMALL_CNN_BODY),
    SelectorCase("small_cnn", "negations after a leading one", ["!head", "!block2"], ("stem", "block1")),
    SelectorCase("small_cnn", "selection then take-back", ["stem", "block*", "!block2"], ("stem", "block1")),
    SelectorCase(
        "small_cnn", "a take-back inside a module", ["idx:0..3", "!block1.0.0"], ("stem", "block1.0.1", "block2")
    ),
    SelectorCase("small_cnn", "a frozen bn weight fixes its bias", ["block1.0.1.weight"], ("block1.0.1",)),
    SelectorCase("small_cnn", "a misspelt name", ["blokc1"], refused_naming="block1"),
    SelectorCase("small_cnn", "a misspelt name after good ones", ["stem", "!hed"], refused_naming="head"),
    # Selectors on resnet18: children 0=conv1 1=bn1 2=relu 3=maxpool 4..7=layer1..4 8=avgpool 9=fc.
    SelectorCase("resnet18", "a module name", ["layer1"], ("layer1",)),
    SelectorCase("resnet18", "a child index", [4], ("layer1",)),
    SelectorCase("resnet18", "a negative idx", ["idx:-3"], ("layer4",)),
    SelectorCase("resnet18", "an idx range is python's a:b", ["idx:0..5"], ("conv1", "bn1", "layer1")),
    SelectorCase("resnet18", "a glob", ["layer[34].*"], ("layer3", "layer4")),
    SelectorCase("resnet18", "a regex", ["re:^layer4\\.1\\."], ("layer4.1",)),
    SelectorCase("resnet18", "a leading negation starts from everything", ["!fc"], RESNET18_BODY),
    SelectorCase("resnet18", "selection then take-back", ["layer4", "!layer4.1"], ("layer4.0",)),
    SelectorCase("resnet18", "a misspelt name", ["layr4"], refused_naming="layer4"),
    # BatchNorm, every policy: small_cnn with stem and block1 frozen.
    BatchNormCase("small_cnn", "train", ["stem", "block1"], fixed=(), moving=SMALL_CNN_BODY),
    BatchNormCase("small_cnn", "eval_frozen", ["stem", "block1"], fixed=("stem", "block1"), moving=("block2",)),
    BatchNormCase("small_cnn", "eval_all", ["stem", "block1"], fixed=SMALL_CNN_BODY, moving=()),
    BatchNormCase("small_cnn", "replace_frozen", ["stem", "block1"], fixed=("stem", "block1"), moving=("block2",)),
    # resnet18 (downsample BatchNorm included) only under the default policy: the research edition takes
    # bn_policy at render time, and each further render costs more than all of a backbone's rows.
    BatchNormCase(
        "resnet18", "eval_frozen", ["idx:0..5"], fixed=("bn1", "layer1"), moving=("layer2", "layer3", "layer4")
    ),
    # Loading (on each backbone): `head` stands for that backbone's head.
    LoadCase("a DataParallel 'module.' prefix is stripped", prefixed("module.")),
    LoadCase("a torch.compile '_orig_mod.' prefix is stripped", prefixed("_orig_mod.")),
    LoadCase("a DDP-wrapped compiled model's 'module._orig_mod.' prefix is stripped", prefixed("module._orig_mod.")),
    LoadCase("a compiled DDP model's '_orig_mod.module.' prefix is stripped", prefixed("_orig_mod.module.")),
    LoadCase("a head of another shape is reported, the rest loads", with_a_five_class_head, ("head",), ("head",)),
    LoadCase("a {'state_dict': ...} wrapper is opened", wrapped("state_dict")),
    LoadCase("a {'model': ...} wrapper is opened", wrapped("model")),
    LoadCase("a {'model_state': ...} wrapper is opened", wrapped("model_state")),
    LoadCase("a safetensors file loads", as_safetensors),
    LoadCase("a file below min_loaded_fraction is refused", only_the_head, refused=True),
]


def rows(kind: type, backbone_free: bool = False) -> list:
    """The rows of one kind as pytest params (load rows once per backbone); a `differs` row is a strict xfail."""
    params = []
    for case in CASES:
        if not isinstance(case, kind):
            continue
        for backbone in BACKBONES if backbone_free else [case.backbone]:
            marks = [pytest.mark.xfail(strict=True, reason=case.differs)] if case.differs else []
            label = getattr(case, "proves", None) or getattr(case, "policy", "")
            params.append(pytest.param(case, backbone, id=f"{backbone}: {label}", marks=marks))
    return params


def on(head: str, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """A load row's prefixes on one backbone: "head" is its head's name."""
    return tuple(head if prefix == "head" else prefix for prefix in prefixes)


def under(names: list[str], prefixes: tuple[str, ...]) -> set[str]:
    return {name for name in names if any(name == p or name.startswith(p + ".") for p in prefixes)}


# ---------------------------------------------------------------------------
# The adapters: a few lines each, calling the edition's own functions.
# ---------------------------------------------------------------------------


class Teaching:
    """profile=teaching: the spec is freeze.frozen, bn_policy a config key, --init goes through load_matching."""

    def __init__(self, root: Path, backbone: str, bn_policy: str) -> None:
        package = f"teach_{backbone}"
        answers = {"project_name": package, "profile": "teaching", "features": [], "backbone": backbone}
        project = render(root / package, answers, src=ROOT)
        self.mod = {m: import_rendered(project, package, m) for m in ("config", "model", "freeze", "checkpoint")}
        self.refusal = self.mod["config"].UserError

    def build(self, frozen: list | None = None, bn_policy: str = DEFAULT_POLICY) -> nn.Module:
        """A seeded model from the edition's build_model, with `frozen` applied (None: no freeze)."""
        overrides = [f"freeze.frozen={json.dumps(frozen or [])}", f"freeze.bn_policy={bn_policy}"]
        self.config = self.mod["config"].load_config(overrides=overrides)
        torch.manual_seed(0)
        model = self.mod["model"].build_model(self.config)
        if frozen is not None:
            self.mod["freeze"].apply_freeze(model, self.config, 0)
        return model

    def load(self, model: nn.Module, path: Path) -> tuple[set[str], set[str]]:
        checkpoint = self.mod["checkpoint"]
        report = checkpoint.load_matching(model, checkpoint.read_state_dict(path), self.config.init.min_loaded_fraction)
        return set(report["loaded"]), {row.split()[0] for row in report["wrong shape"]}


class Research:
    """profile=research: the freeze engine takes the frozen spec, bn_policy is a render answer, --init is load_init."""

    def __init__(self, root: Path, backbone: str, bn_policy: str) -> None:
        package = f"research_{backbone}_{bn_policy}"
        answers = {"project_name": package, "features": [], "backbone": backbone, "bn_policy": bn_policy}
        project = render(root / package, answers, src=ROOT)
        self.mod = {m: import_rendered(project, package, m) for m in ("config", "model", "freeze", "weights")}
        self.refusal = (
            self.mod["freeze"].FreezeSpecError,
            import_rendered(project, package, "checkpoint").CheckpointError,
        )
        self.bn_policy = bn_policy

    def build(self, frozen: list | None = None, bn_policy: str = DEFAULT_POLICY) -> nn.Module:
        assert self.mod["freeze"].BN_POLICY == bn_policy == self.bn_policy
        self.config = self.mod["config"].load_config()
        torch.manual_seed(0)
        model = self.mod["model"].build_model(self.config)  # pretrained=False: nothing is downloaded
        if frozen is not None:
            self.mod["freeze"].freeze(model, frozen, self.config.freeze.bn_modes, "freeze.frozen")
        return model

    def load(self, model: nn.Module, path: Path) -> tuple[set[str], set[str]]:
        plan = self.mod["weights"].load_init(model, path, self.config.init)
        return set(plan.loaded), {key for key, _, _ in plan.mismatched}


EDITIONS = {"teaching": Teaching, "research": Research}


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    """edition(name, backbone, bn_policy): that edition's adapter, rendered on first use."""
    root = tmp_path_factory.mktemp("editions")
    made: dict[tuple, Teaching | Research] = {}

    def get(name: str, backbone: str, bn_policy: str = DEFAULT_POLICY):
        key = (name, backbone, bn_policy if name == "research" else None)
        if key not in made:
            made[key] = EDITIONS[name](root, backbone, bn_policy)
        return made[key]

    return get


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "backbone"), rows(SelectorCase))
def test_a_selector_freezes_the_same_tensors_in_both_editions(edition, case, backbone):
    frozen, refusals, names = {}, {}, {}
    for name in EDITIONS:
        adapter = edition(name, backbone)
        try:
            model = adapter.build(case.selectors)
        except adapter.refusal as err:
            refusals[name] = str(err)
            continue
        frozen[name] = frozen_names(model)
        names[name] = [n for n, _ in model.named_parameters()]
    if case.refused_naming:
        assert refusals.keys() == EDITIONS.keys(), f"accepted by {sorted(frozen)}: froze {frozen}"
        for name, message in refusals.items():
            assert case.refused_naming in message, f"{name}: {message}"
        return
    assert not refusals
    assert names["teaching"] == names["research"], "the editions build different models"
    expected = under(names["teaching"], case.freezes)
    assert expected, "the row names no parameter"
    assert frozen == {name: expected for name in EDITIONS}


@pytest.mark.parametrize(("case", "backbone"), rows(BatchNormCase))
def test_a_bn_policy_keeps_the_same_batchnorm_buffers_fixed_in_both_editions(edition, case, backbone):
    moved = {}
    for name in EDITIONS:
        model = edition(name, backbone, case.policy).build(case.spec, case.policy)
        before = {key: value.clone() for key, value in model.state_dict().items() if key.endswith(BN_BUFFERS)}
        model.train()  # after the freeze: a fixed layer must stay fixed through it
        torch.manual_seed(1)
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        after = model.state_dict()
        moved[name] = {key for key, value in before.items() if not torch.equal(value, after[key])}
        buffers = list(before)
    assert set(buffers) == under(buffers, case.fixed) | under(buffers, case.moving), "the row misses a layer"
    assert not under(buffers, case.fixed) & under(buffers, case.moving)
    assert moved == {name: under(buffers, case.moving) for name in EDITIONS}


@pytest.fixture(scope="module")
def reference(edition) -> dict[str, dict[str, torch.Tensor]]:
    """Per backbone: weights to write into files, seeded apart from the models the editions build."""
    weights = {}
    for backbone in BACKBONES:
        torch.manual_seed(123)
        weights[backbone] = {k: v.clone() for k, v in edition("teaching", backbone).build().state_dict().items()}
        for value in weights[backbone].values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))  # BatchNorm statistics too, so a loaded one is seen
    return weights


@pytest.mark.parametrize(("case", "backbone"), rows(LoadCase, backbone_free=True))
def test_a_weights_file_loads_the_same_keys_in_both_editions(edition, reference, tmp_path, case, backbone):
    head = HEADS[backbone]
    path = case.write(reference[backbone], head, tmp_path)
    outcome = {}
    for name in EDITIONS:
        adapter = edition(name, backbone)
        model = adapter.build()
        built = {key: value.clone() for key, value in model.state_dict().items()}
        try:
            loaded, wrong_shape = adapter.load(model, path)
        except adapter.refusal:
            untouched = all(torch.equal(value, built[key]) for key, value in model.state_dict().items())
            outcome[name] = "refused, model untouched" if untouched else "refused, model changed"
            continue
        state = model.state_dict()
        assert all(torch.equal(state[key], reference[backbone][key]) for key in loaded), f"{name}: a loaded key differs"
        outcome[name] = (loaded, wrong_shape)
    if case.refused:
        assert outcome == dict.fromkeys(EDITIONS, "refused, model untouched")
        return
    keys = list(reference[backbone])
    expected = (set(keys) - under(keys, on(head, case.not_loaded)), under(keys, on(head, case.wrong_shape)))
    assert outcome == dict.fromkeys(EDITIONS, expected)
