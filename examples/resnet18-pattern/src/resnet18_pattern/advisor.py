"""`resnet18_pattern plan` and `resnet18_pattern suggest`: what to freeze, measured on your model and data.

plan trains every candidate for a few batches (a linear probe, each cut at a
stage boundary, a full fine-tune and the config's own spec) and reports
what it trains, what its optimizer holds, what a step holds in memory and
how long a step takes. suggest ranks the blocks by the relative gradient
norm ||g|| / ||theta|| the data gives them (Lee et al. 2022, "Surgical
fine-tuning", arXiv 2210.11466: their Auto-RGN criterion).

Both work on copies: the model built from the config (and --init) is never
changed, every random generator is put back, and nothing is written.

Memory on the CPU is "step memory": the parameters and buffers, the
gradients and the optimizer state of what trains, and the tensors autograd
saves for backward at a step's peak (each storage counted once). It leaves
out the allocator's cache and the temporaries inside one operation, so it
ranks choices; it does not predict a process's RSS. On CUDA the figure is
torch.cuda.max_memory_allocated over the timed steps, which includes them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .config import Config, ConfigError, load_config
from .data import DEFAULT_DATA, make_datasets
from .distributed import SINGLE
from .layers import format_rows
from .model import BLOCK_CONTAINERS, blocks_with_parameters, build_model
from .optim import make_optimizer
from .rng import rngs_kept, seed_everything
from .run import amp_dtype, loader_workers, pick_device, prepare_model, use_channels_last
from .train import train_one_epoch
from .weights import load_init

MAX_BATCHES = 1000
WARMUP_STEPS = 2  # untimed: the first steps allocate the optimizer state and warm the kernels
MAX_CUTS = 12  # a model with more stage boundaries (a VGG's layers) gets this many, evenly spread
# The [freeze] key a printed spec sets: a list that starts with "!" freezes everything but.
SPEC_KEY = "freeze.patterns"


@dataclass
class Choice:
    """One thing to try: its name, and the --set values that select it (none: the config as it is)."""

    name: str
    overrides: list[str]


@dataclass
class Row:
    choice: str
    trainable: int
    total: int
    optimizer_bytes: int
    memory_bytes: int
    step_seconds: float
    overrides: list[str]


# ---------------------------------------------------------------------------
# The model's units: the stem, each stage, the head
# ---------------------------------------------------------------------------


def units(model: nn.Module) -> list[tuple[str, set[str]]]:
    """The model cut at its stage boundaries, in depth order: (name, parameter names), the head last.

    A stage starts at the first block of each top-level child that is (or
    holds) one of model.BLOCK_CONTAINERS and does not hold the head (a
    ResNet's layer1 ... layer4); with one such child, at every block inside
    it (a ViT's encoder layers, a VGG's features); with none, at every
    top-level child. At most MAX_CUTS, evenly spread. Everything before
    the first stage, parameters outside every block included, is the stem.
    """
    blocks = blocks_with_parameters(model)
    body, head = blocks[:-1], blocks[-1]
    tops = [block.split(".")[0] for block in body]
    staged = [
        top
        for top in dict.fromkeys(tops)
        if any(c == top or c.startswith(top + ".") for c in BLOCK_CONTAINERS) and not head.startswith(top + ".")
    ]
    if len(staged) >= 2:
        cuts = [tops.index(t) for t in staged]
    elif staged:
        cuts = [i for i, t in enumerate(tops) if t in staged]
    else:
        cuts = list(range(len(body)))
    cuts = [i for i in cuts if i > 0]
    if len(cuts) > MAX_CUTS:
        step = (len(cuts) - 1) / (MAX_CUTS - 1)
        cuts = sorted({cuts[round(len(cuts) - 1 - k * step)] for k in range(MAX_CUTS)})
    names = [name for name, _ in model.named_parameters()]
    inside = {block: {n for n in names if n.startswith(block + ".")} for block in blocks}
    spans = list(zip([0, *cuts], [*cuts, len(body)], strict=True))
    parts = [set().union(*(inside[b] for b in body[start:end])) for start, end in spans]
    parts[0] |= set(names) - set().union(*inside.values())  # loose tensors (a class token) go with the stem
    labelled = [("stem", parts[0])] + [(", ".join(cover(model, part)), part) for part in parts[1:]]
    return [(label, part) for label, part in labelled if part] + [(f"head ({head})", inside[head])]


def cover(model: nn.Module, params: set[str]) -> list[str]:
    """The fewest names that select exactly `params`: the outermost modules wholly inside, then loose tensors."""
    picked: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in picked):
            continue
        held = {f"{name}.{n}" for n, _ in module.named_parameters()}
        if held and held <= params:
            picked.append(name)
    covered = {n for n in params if any(n.startswith(p + ".") for p in picked)}
    return picked + [n for n, _ in model.named_parameters() if n in params and n not in covered]


def spec_overrides(model: nn.Module, trainable: set[str], config: Config) -> list[str]:
    """The --set values that make `trainable` (names of the plain model) the parameters that train."""
    everything = len(trainable) == sum(1 for _ in model.parameters())
    selectors = cover(model, trainable)
    values = [f"{SPEC_KEY}={json.dumps([] if everything else ['!' + s for s in selectors])}"]
    if config.unfreeze.stages:
        values.append("unfreeze.stages=[]")  # a choice is one state for the whole run
    return values


def choices(model: nn.Module, config: Config) -> list[Choice]:
    """A linear probe, one cut per stage boundary (head side first), a full fine-tune, the config's spec."""
    parts = units(model)
    found = []
    for first in range(len(parts) - 1, -1, -1):
        trainable = set().union(*(part for _, part in parts[first:]))
        name = f"from {parts[first][0]}"
        if first in (0, len(parts) - 1):
            name = "full fine-tune" if first == 0 else "linear probe"
        found.append(Choice(name, spec_overrides(model, trainable, config)))
    mine = "config"
    return [*found, Choice(mine, [])]


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


@dataclass
class Batches:
    """Training batches of --data as train draws them: its transforms, its loader workers, a seeded shuffle."""

    dataset: Dataset
    size: int
    count: int  # the batches a measure times
    workers: int
    seed: int

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Full batches without end, the same ones in the same order on every call."""
        order = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(self.dataset, generator=order)
        loader = DataLoader(self.dataset, self.size, sampler=sampler, num_workers=self.workers, drop_last=True)
        while True:
            yield from loader

    def first(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with rngs_kept():
            return list(itertools.islice(self.stream(), self.count))


def training_batches(data: str, config: Config, count: int) -> Batches:
    """--batches batches of --data; too few images for them is one line."""
    if not 1 <= count <= MAX_BATCHES:
        raise ConfigError(f"--batches {count}: a whole number from 1 to {MAX_BATCHES}")
    train_set, _ = make_datasets(data, config)
    size = config.train.batch_size
    if len(train_set) < count * size:
        raise ConfigError(
            f"--data {data}: {len(train_set)} training images, fewer than --batches {count} of "
            f"train.batch_size {size} ({count * size}); lower --batches or --set train.batch_size"
        )
    workers = loader_workers(config.train.num_workers, data, SINGLE)
    return Batches(train_set, size, count, workers, config.train.seed)


class Steps:
    """The batches for train_one_epoch, WARMUP_STEPS untimed ones first; each timed step's seconds.

    A step runs from one batch asked for to the next: loading the batch,
    forward, backward, the optimizer and the loop's own bookkeeping, what
    an epoch's time is made of. `pack` counts the bytes autograd saves.
    """

    def __init__(self, batches: Batches, device: torch.device, held: list[torch.Tensor]) -> None:
        self.batches, self.device = batches, device
        self.seconds: list[float] = []
        self.saved_peak = 0
        self._held = {t.untyped_storage().data_ptr() for t in held}
        self._saved, self._storages = 0, set(self._held)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._storages:
            self._storages.add(storage.data_ptr())
            self._saved += storage.nbytes()
        return tensor

    def __iter__(self) -> Iterator[Any]:
        stream = self.batches.stream()
        for step in range(WARMUP_STEPS + self.batches.count):
            self._sync()
            started = time.perf_counter()
            batch = next(stream)
            self._saved, self._storages = 0, set(self._held)
            yield batch
            self._sync()
            if step >= WARMUP_STEPS:
                self.seconds.append(time.perf_counter() - started)
                self.saved_peak = max(self.saved_peak, self._saved)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(model: nn.Module, config: Config, batches: Batches, device: torch.device) -> tuple[int, int, float]:
    """Train a copy of `model` on `batches`: its optimizer state and step memory in bytes, the median step in s.

    `model` and every random generator are left as they were.
    """
    with rngs_kept():
        probe = copy.deepcopy(model).to(device)
        optimizer = make_optimizer(probe, config)
        amp = amp_dtype(config.train, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        channels_last = use_channels_last(config.train.channels_last, probe, device)
        held = [*probe.parameters(), *probe.buffers()]
        steps = Steps(batches, device, held)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(steps.pack, lambda tensor: tensor):
            train_one_epoch(probe, steps, optimizer, scaler, device, amp, channels_last=channels_last)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    else:
        grads = sum(p.nbytes for p in probe.parameters() if p.requires_grad)
        memory = sum(t.nbytes for t in held) + grads + state + steps.saved_peak
    return state, memory, statistics.median(steps.seconds)


def plan(args: argparse.Namespace, config: Config) -> list[Row]:
    """Each choice built as train builds it (config, --init, --set, the choice's own --set) and measured."""
    batches = training_batches(args.data, config, args.batches)
    device = pick_device(args.device)
    rows, seen, reports = [], {}, io.StringIO()
    for choice in choices(build_model(config), config):
        chosen = load_config(args.config, [*args.set, *choice.overrides])
        # --init's load report, once and on stderr: stdout is the table or the JSON.
        with rngs_kept(), contextlib.redirect_stdout(reports if rows else sys.stderr):
            seed_everything(chosen.train.seed)
            model, _ = prepare_model(chosen, init=args.init, pretrained=chosen.model.pretrained and args.init is None)
        trains = frozenset(name for name, p in model.named_parameters() if p.requires_grad)
        name = f"{choice.name} (= {seen[trains]})" if not choice.overrides and trains in seen else choice.name
        seen.setdefault(trains, choice.name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        state, memory, seconds = measure(model, chosen, batches, device)
        rows.append(Row(name, trainable, total, state, memory, seconds, choice.overrides))
    return rows


# ---------------------------------------------------------------------------
# suggest: the relative gradient norm of each unit
# ---------------------------------------------------------------------------


def gradient_ratios(
    model: nn.Module, parts: list[tuple[str, set[str]]], batches: list[Any], device: torch.device
) -> dict[str, float]:
    """Per unit, ||g|| / ||theta|| summed over the batches; every parameter of a copy of `model` takes gradients.

    The copy runs in eval mode: BatchNorm normalises with its running
    statistics and never updates them, and dropout is off, so the figure
    is the data's, not the noise's.
    """
    with rngs_kept():
        probe = copy.deepcopy(model).to(device).eval()
        for param in probe.parameters():
            param.requires_grad_(True)
        params = dict(probe.named_parameters())
        scores = dict.fromkeys((label for label, _ in parts), 0.0)
        for inputs, labels in batches:
            probe.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(probe(inputs.to(device)), labels.to(device)).backward()
            for label, names in parts:
                grad = norm([params[n].grad for n in names if params[n].grad is not None])
                weight = norm([params[n].detach() for n in names])
                scores[label] += grad / max(weight, 1e-12)
    return scores


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double().square().sum() for t in tensors), torch.zeros((), dtype=torch.float64))))


def suggest(args: argparse.Namespace, config: Config) -> tuple[list[tuple[str, float]], Choice]:
    """The blocks (units but the head) by summed ratio, highest first; the choice of the top --top and the head."""
    batches = training_batches(args.data, config, args.batches).first()
    device = pick_device(args.device)
    with rngs_kept(), contextlib.redirect_stdout(sys.stderr):  # --init's load report; stdout is the answer
        seed_everything(config.train.seed)  # the new head train would start from
        model = build_model(config, pretrained=config.model.pretrained and args.init is None)
        if args.init is not None:
            load_init(model, args.init, config.init)
    parts = units(model)
    blocks = parts[:-1]
    if not 1 <= args.top <= len(blocks):
        raise ConfigError(f"--top {args.top}: this model has {len(blocks)} blocks to rank; pick 1 to {len(blocks)}")
    scores = gradient_ratios(model, parts, batches, device)
    ranking = sorted(((label, scores[label]) for label, _ in blocks), key=lambda item: -item[1])
    top = {label for label, _ in ranking[: args.top]}
    trainable = set().union(*(names for label, names in parts if label in top or label == parts[-1][0]))
    name = "train " + " + ".join(label for label, _ in ranking[: args.top]) + " and the head"
    return ranking, Choice(name, spec_overrides(model, trainable, config))


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------


def train_command(overrides: list[str], args: argparse.Namespace) -> str:
    """The train command a row's --set values go into, with this command's own options."""
    command = ["resnet18_pattern", *(["--config", args.config] if args.config else [])]
    command += [part for value in [*args.set, *overrides] for part in ("--set", value)]
    command += ["train", "--out", "RUN"]
    for flag, value in (("--data", args.data), ("--init", args.init)):
        if value is not None and value != DEFAULT_DATA:
            command += [flag, value]
    return shlex.join(command)


def cmd_plan(args: argparse.Namespace, config: Config) -> int:
    rows = plan(args, config)
    if args.json:
        commands = [train_command(row.overrides, args) if row.overrides else None for row in rows]
        answer = [{**asdict(row), "command": command} for row, command in zip(rows, commands, strict=True)]
        print(json.dumps(answer, indent=2))
        return 0
    full = next(row for row in rows if row.choice == "full fine-tune")
    where = "peak CUDA memory" if pick_device(args.device).type == "cuda" else "step memory"
    table = [
        {
            "choice": row.choice,
            "params": row.trainable,
            "share": f"{100 * row.trainable / row.total:.3g}%",
            "optimizer": megabytes(row.optimizer_bytes),
            where: megabytes(row.memory_bytes),
            "step": f"{row.step_seconds * 1000:.1f} ms",
            "vs full": f"x{row.step_seconds / full.step_seconds:.2f}",
        }
        for row in rows
    ]
    size = config.train.batch_size
    print(f"plan: {args.batches} batches of {size} from {args.data}; the median step, after {WARMUP_STEPS} untimed")
    print("\n".join(format_rows(table, ["choice", "params", "share", "optimizer", where, "step", "vs full"])))
    print("\nto train one (its --set values are the choice):")
    for row in rows:
        if row.overrides:
            print(f"  {row.choice}:\n    {train_command(row.overrides, args)}")
    return 0


def megabytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MB" if count >= 2**20 else f"{count / 2**10:,.1f} KB"


def cmd_suggest(args: argparse.Namespace, config: Config) -> int:
    ranking, choice = suggest(args, config)
    if args.json:
        ranked = [{"block": label, "ratio": score} for label, score in ranking]
        answer = {"ranking": ranked, "choice": choice.name, "set": choice.overrides}
        print(json.dumps({**answer, "command": train_command(choice.overrides, args)}, indent=2))
        return 0
    print(f"suggest: ||g|| / ||theta|| of each block, summed over {args.batches} batches of {args.data}")
    best = ranking[0][1] or 1.0
    table = [
        {"rank": i, "block": label, "ratio": f"{score:.3g}", "of the first": f"{score / best:.0%}"}
        for i, (label, score) in enumerate(ranking, 1)
    ]
    print("\n".join(format_rows(table, ["rank", "block", "ratio", "of the first"])))
    print(
        "\nA high ratio says the data's gradient would move that block most for its size, before any training."
        "\nIt is not a verdict: on the template's bench the first block was the worst single block to train"
        "\n(docs/advisor.md). Try it beside plan's cheapest rows in a short run."
    )
    print(f"\n{choice.name}:\n  {train_command(choice.overrides, args)}")
    return 0
