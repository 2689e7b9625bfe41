"""The blog traps, live: each habit beside this project's code, on this model.

Fine-tuning recipes are usually learned from blog snippets, and each habit
below has a trap. Every function here runs one habit the way the snippets
write it, then does the same job with this project's own code, on the same
model (small_cnn, random weights) and the same synthetic data.
`teaching_small_cnn traps` prints what each side measured. The articles the
habits come from, as their docstrings cite them:

  [freeze-a-layer]  "pytorch冻结想冻结的预训练模型中的某一层" (zhihu)
  [fix-bn]          "固定部分参数进行训练", its BatchNorm section
  [templates]       "Pytorch载入导出、冻结权重模板大全"

Each trap freezes everything but the head (a linear probe), so "frozen"
means the same on both sides.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import CheckpointError, read_state_dict
from .config import Config, Stage, load_config
from .data import DEFAULT_DATA, make_datasets
from .freeze import FreezeSpecError, FreezeState, freeze, unfreeze_stage
from .model import HEAD, build_model
from .optim import add_groups, cosine_schedule, make_optimizer, param_groups
from .rng import seed_everything
from .run import prepare_model
from .train import fit, train_one_epoch
from .weights import load_init

CPU = torch.device("cpu")
Tensors = dict[str, torch.Tensor]


@dataclass
class Row:
    """One measure of one trap: what the habit gave, what this project gave."""

    trap: str
    measure: str
    naive: float | int | str
    ours: float | int | str
    unit: str
    shown: bool  # the habit failed and our code held

    def to_json(self) -> dict[str, float | int | str]:
        return {k: v for k, v in asdict(self).items() if k != "shown"}


def trap_config(config: Config) -> Config:
    """The config made small enough to run every trap in seconds on a CPU.

    The model is this config's; what decides a verdict (weight decay, the
    init rules, BatchNorm overrides) is the packaged default, so a config of
    your own cannot make a trap vanish.
    """
    config, defaults = copy.deepcopy(config), load_config()
    config.init, config.freeze.bn_modes = defaults.init, {}
    config.train.weight_decay = defaults.train.weight_decay or 1e-4
    vars(config.train).update(epochs=2, batch_size=8, num_workers=0)
    config.train.image_size = 32
    vars(config.data).update(synthetic_train_size=32, synthetic_val_size=16, augment=False)
    # The linear probe, whatever this project's own spec: everything but the head is frozen.
    config.freeze.keep_trainable = [HEAD]
    config.unfreeze.stages = []
    return config


def datasets(config: Config) -> tuple[Dataset, Dataset]:
    return make_datasets(DEFAULT_DATA, config)


def snapshot(model: nn.Module) -> Tensors:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def max_change(before: Tensors, after: Tensors, names: list[str]) -> float:
    """The largest absolute difference between two snapshots over `names` (0.0 for none)."""
    return max((float((after[n].double() - before[n].double()).abs().max()) for n in names), default=0.0)


def is_head(name: str) -> bool:
    return name.startswith(HEAD + ".")


def our_probe(config: Config) -> tuple[nn.Module, FreezeState]:
    """The model as train builds it: trap_config's probe spec and bn_policy's BatchNorm modes."""
    seed_everything(config.train.seed)
    return prepare_model(config)


def our_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    """One epoch through this project's training step."""
    train_one_epoch(model, loader, optimizer, CPU)


def habit_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    """The training loop every snippet has."""
    model.train()
    for inputs, labels in loader:
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def misspelt(name: str) -> str:
    """`name` with two letters of its last part swapped: stem.0.weight -> stem.0.wieght."""
    head, dot, last = name.rpartition(".")
    typo = last[0] + last[2] + last[1] + last[3:] if len(last) > 2 and last[1] != last[2] else last + "s"
    return head + dot + typo


def trap_typo(config: Config) -> list[Row]:
    """A list of names to freeze, typed by hand, with one name misspelt.

    The habit [freeze-a-layer]: list the names, then set requires_grad by
    membership. A misspelt name is simply never equal to
    anything, so its tensor trains on and nothing says so. Our freeze spec
    refuses a selector that matches nothing, naming the closest real names.
    """
    model = build_model(config)
    first_two = [name for name, _ in model.named_parameters()][:2]
    no_grad = [first_two[0], misspelt(first_two[1])]
    for name, value in model.named_parameters():
        if name in no_grad:
            value.requires_grad = False
    naive = sum(not p.requires_grad for p in model.parameters())
    ours_model = build_model(config)
    try:
        freeze(ours_model, no_grad, {}, "freeze list")
        ours: int | str = sum(not p.requires_grad for p in ours_model.parameters())
    except FreezeSpecError as err:
        ours = f"error: {err}"
    measure = f"tensors frozen of the {len(no_grad)} listed"
    return [Row("typo", measure, naive, ours, "tensors", naive < len(no_grad) and str(ours).startswith("error"))]


def trap_zeroed_grads(config: Config) -> list[Row]:
    """Keep every parameter in AdamW and zero the frozen ones' gradients after backward.

    The habit [freeze-a-layer], its method 4: the frozen tensors stay in the
    optimizer and get a zero gradient before each step. AdamW's weight decay
    still shrinks them every step (and Adam's moments, had they ever seen a
    gradient, would keep moving them). Our optimizer never holds a frozen
    tensor.
    """
    train_set, _ = datasets(config)
    seed_everything(config.train.seed)
    model = build_model(config)
    frozen = [name for name, _ in model.named_parameters() if not is_head(name)]
    before = snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    model.train()
    for inputs, labels in DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        for name, param in model.named_parameters():
            if name in frozen and param.grad is not None:
                param.grad.zero_()
        optimizer.step()
    naive = max_change(before, snapshot(model), frozen)

    ours_model, _ = our_probe(config)
    ours_before = snapshot(ours_model)
    ours_optimizer = make_optimizer(ours_model, config)
    our_epoch(ours_model, ours_optimizer, DataLoader(train_set, config.train.batch_size))
    ours = max_change(ours_before, snapshot(ours_model), frozen)
    held = {id(p) for group in ours_optimizer.param_groups for p in group["params"]}
    params = dict(ours_model.named_parameters())
    ours_held = sum(id(params[name]) in held for name in frozen)
    moved = "max abs change of the frozen weights after an epoch"
    return [
        Row("zeroed_grads", "frozen tensors the optimizer holds", len(frozen), ours_held, "tensors", ours_held == 0),
        Row("zeroed_grads", moved, naive, ours, "", naive > 0 and ours == 0),
    ]


def head_inputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What the head sees (the frozen backbone's features), in eval mode."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(HEAD).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(inputs)
    hook.remove()
    return seen[0]


def trap_batchnorm(config: Config) -> list[Row]:
    """requires_grad = False on the backbone, then model.train() every epoch.

    The habit, which [fix-bn] warns about and the freeze snippets forget:
    requires_grad only stops the weights. In train()
    mode a BatchNorm layer normalises with each batch's statistics and
    overwrites its running mean and variance, so the "frozen" backbone
    computes other features after every epoch. Our BatchNorm modes
    (bn_policy = "eval_frozen") keep them fixed across model.train().
    """
    train_set, val_set = datasets(config)
    val_inputs = next(iter(DataLoader(val_set, batch_size=config.train.batch_size)))[0]
    seed_everything(config.train.seed)
    model = build_model(config)
    stats = [name for name in model.state_dict() if name.endswith(("running_mean", "running_var"))]
    for name, param in model.named_parameters():
        if not is_head(name):
            param.requires_grad = False
    before, features = snapshot(model), head_inputs(model, val_inputs)
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=config.train.lr)
    habit_epoch(model, optimizer, DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True))
    naive_stats = max_change(before, snapshot(model), stats)
    naive_features = float((head_inputs(model, val_inputs) - features).abs().max())

    ours_model, _ = our_probe(config)
    before, features = snapshot(ours_model), head_inputs(ours_model, val_inputs)
    our_epoch(ours_model, make_optimizer(ours_model, config), DataLoader(train_set, config.train.batch_size))
    ours_stats = max_change(before, snapshot(ours_model), stats)
    ours_features = float((head_inputs(ours_model, val_inputs) - features).abs().max())
    shown = naive_stats > 0 and ours_stats == 0
    return [
        Row("batchnorm", "max abs change of BatchNorm running_mean/var", naive_stats, ours_stats, "", shown),
        Row(
            "batchnorm",
            "max abs change of the frozen backbone's features (eval mode)",
            naive_features,
            ours_features,
            "",
            naive_features > 0 and ours_features == 0,
        ),
    ]


def trap_strict_false(config: Config) -> list[Row]:
    """load_state_dict(..., strict=False) of a file saved from nn.DataParallel.

    The habit [templates], its shape-matched and first-N loads: strict=False,
    so that a new head or a missing key does not stop the load. A file saved from a
    DataParallel model has every key under `module.`, so nothing matches and
    nothing loads, without a word: training starts from random weights under
    a pretrained name. Our --init strips the prefix and reports every key; a
    file that still fills too little of the model is refused.
    """
    seed_everything(config.train.seed + 1)
    trained = build_model(config).state_dict()
    rows = []
    for prefix, what in (
        ("module.", "a DataParallel file (module.*)"),
        ("encoder.", "another model's file (encoder.*)"),
    ):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "pretrained.pt"
            torch.save({prefix + name: tensor for name, tensor in trained.items()}, path)
            state_dict = torch.load(path, weights_only=True)
            result = build_model(config).load_state_dict(state_dict, strict=False)
            naive = len(state_dict) - len(result.unexpected_keys)  # the file's tensors that went in
            ours_model = build_model(config)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    ours: int | str = len(load_init(ours_model, path, config.init).loaded)
            except CheckpointError as err:
                # Its first sentence (the rest points at the load table, not shown
                # here), with the file's name for the temporary path.
                ours = "error: " + str(err).split(". ")[0].replace(str(path), path.name)
        held = ours == len(trained) if prefix == "module." else str(ours).startswith("error")
        rows.append(Row("strict_false", f"tensors loaded from {what}", naive, ours, "tensors", naive == 0 and held))
    return rows


def released_module(model: nn.Module) -> str:
    """The last top-level child with parameters that neither is nor holds the head: "unfreeze the top block"."""
    children = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    outside = [name for name in children if name != HEAD and not HEAD.startswith(name + ".")]
    if outside:
        return outside[-1]
    last = next(name for name, _ in reversed(list(model.named_parameters())) if not is_head(name))
    return last.rpartition(".")[0]


def trap_unfreeze_without_group(config: Config) -> list[Row]:
    """Release part of the backbone at epoch 1 by requires_grad = True, and nothing else.

    The habit [freeze-a-layer], its method 1 without the add_param_group
    line: the optimizer was built over the trainable parameters, so tensors
    released later are not in it and never move, although they now get
    gradients. Our unfreeze stage adds them as new param groups, on the schedule.
    """
    train_set, _ = datasets(config)
    loader = DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True)
    seed_everything(config.train.seed)
    model = build_model(config)
    released = released_module(model)
    names = [f"{released}.{name}" for name, _ in model.get_submodule(released).named_parameters()]
    for name, param in model.named_parameters():
        param.requires_grad = is_head(name)
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=config.train.lr)
    habit_epoch(model, optimizer, loader)
    for param in model.get_submodule(released).parameters():
        param.requires_grad = True
    before = snapshot(model)
    habit_epoch(model, optimizer, loader)
    naive = max_change(before, snapshot(model), names)

    ours_model, state = our_probe(config)
    optimizer = make_optimizer(ours_model, config)
    scheduler = cosine_schedule(optimizer, config.train.epochs)
    our_epoch(ours_model, optimizer, loader)
    scheduler.step()
    now_trainable = unfreeze_stage(ours_model, state, Stage(1, [released]), config.freeze.bn_modes, 1)
    # As train.begin_stages does it: new groups, on the schedule from this epoch.
    groups = param_groups(ours_model, config, now_trainable, f"stage{state.stages_done}", 1.0, 1, 0)
    add_groups(ours_model, optimizer, scheduler, groups, config, config.train.epochs)
    before = snapshot(ours_model)
    our_epoch(ours_model, optimizer, loader)
    ours = max_change(before, snapshot(ours_model), names)
    measure = f"max abs change of {released} in the epoch after its release"
    return [Row("unfreeze_without_group", measure, naive, ours, "", naive == 0 and ours > 0)]


def habit_run(config: Config, path: Path, stop_after: int | None = None, resume: bool = False) -> Tensors:
    """The [templates] script: its checkpoint holds epoch, model and optimizer, and nothing else."""
    torch.manual_seed(config.train.seed)
    model = build_model(config)
    for name, param in model.named_parameters():
        param.requires_grad = is_head(name)
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=config.train.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    start = 0
    if resume:
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        start = checkpoint["epoch"] + 1
    train_set, _ = datasets(config)
    for epoch in range(start, config.train.epochs):
        habit_epoch(model, optimizer, DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True))
        scheduler.step()
        checkpoint = {"epoch": epoch, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict()}
        torch.save(checkpoint, path)
        if stop_after is not None and epoch + 1 - start >= stop_after:
            break
    return snapshot(model)


def trap_resume_without_state(config: Config) -> list[Row]:
    """Stop after epoch 0, resume from weights and optimizer alone, and compare with a run that never stopped.

    The habit [templates], its checkpoint of every weight: the model, the
    optimizer (and the scaler), but not the lr schedule or the RNG state. The
    resumed script seeds torch as it did at the start, so it replays epoch
    0's shuffle (and its new scheduler counts epochs from 0 again, which moves
    the lr of every epoch after the resumed one): it ends somewhere else. Our
    full checkpoints hold everything the next epoch depends on: the two runs
    end bit-identical.
    """
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        whole = habit_run(config, root / "whole.pth")
        habit_run(config, root / "split.pth", stop_after=1)
        split = habit_run(config, root / "split.pth", resume=True)
        naive = max_change(whole, split, list(whole))
        with contextlib.redirect_stdout(io.StringIO()):
            fit(config, root / "ours-whole", device="cpu")
            fit(config, root / "ours-split", device="cpu", stop_after=1)
            fit(None, None, resume=root / "ours-split", device="cpu")
        ours_whole = read_state_dict(root / "ours-whole" / "last.ckpt")
        ours = max_change(ours_whole, read_state_dict(root / "ours-split" / "last.ckpt"), list(ours_whole))
    measure = "max abs difference from an uninterrupted run"
    return [Row("resume_without_state", measure, naive, ours, "", naive > 0 and ours == 0)]


TRAPS: dict[str, Callable[[Config], list[Row]]] = {
    "typo": trap_typo,
    "zeroed_grads": trap_zeroed_grads,
    "batchnorm": trap_batchnorm,
    "strict_false": trap_strict_false,
    "unfreeze_without_group": trap_unfreeze_without_group,
    "resume_without_state": trap_resume_without_state,
}


def run_traps(config: Config, only: str | None = None) -> list[Row]:
    """Every trap (or the one named), on the config made small by trap_config."""
    small = trap_config(config)
    return [row for name, trap in TRAPS.items() if only in (None, name) for row in trap(small)]


def cell(value: float | int | str) -> str:
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.3g}"
    if isinstance(value, str) and value.startswith("error:"):
        return "refused (below)"
    return str(value)


def format_table(rows: list[Row]) -> str:
    """The rows as a table; refusals are printed in full beneath it."""
    header = ("trap", "measure", "habit", "ours", "verdict")
    lines = [
        (r.trap, r.measure, cell(r.naive), cell(r.ours), "habit fails, ours holds" if r.shown else "NOT SHOWN")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(f"{c:<{w}}" for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]]
    refusals = [f"{r.trap}, ours: {r.ours}" for r in rows if isinstance(r.ours, str) and r.ours.startswith("error:")]
    return "\n".join(text + ([""] if refusals else []) + refusals)
