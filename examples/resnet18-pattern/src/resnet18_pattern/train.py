"""Training: fit() wires model, freeze, data and checkpoints together.

Read top to bottom: prepare_model (build, load --init, freeze, BatchNorm
modes), param groups and make_optimizer (trainable parameters only), the
schedule and add_groups (unfreeze stages), train_one_epoch, evaluate, fit.
The same code runs as one process or as one of N under torchrun; see
distributed.py for what changes then.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from .checkpoint import RunFiles, atomic_write, config_hash, load_resume, safetensors_bytes, torch_bytes, torch_load
from .config import ConfigError
from .data import DEFAULT_DATA, make_datasets
from .distributed import SINGLE, World, all_sum, check_in_sync, gather, on_main, start, sync_buffers, wrap
from .features import CachedBatches, cache_decision, head_inputs
from .freeze import (
    FreezeState,
    Selector,
    apply,
    check_stages,
    freeze,
    manifest,
    parse_stages,
    resolve,
    state_from_manifest,
    unfreeze_stage,
)
from .layers import freeze_summary
from .model import BLOCK_CONTAINERS, HEAD, build_model
from .weights import load_init

try:
    import numpy as np
except ImportError:  # torch runs without numpy; then there is no numpy RNG to seed or keep
    np = None

# New columns go at the end: scripts that read metrics.csv by position keep working.
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "train_acc",
    "images_per_s",
    "trainable_params",
)
# Metrics best.* can be chosen by; checkpoint.mode says whether more is better.
MONITORS = ("val_acc", "val_loss", "train_loss")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if np is not None:
        np.random.seed(seed)


def prepare_model(
    config: dict,
    init: str | Path | None = None,
    pretrained: bool = False,
    sync_bn: bool = False,
    freeze_from: str | Path | None = None,
) -> tuple[nn.Module, FreezeState]:
    """Build the model, load --init, apply the freeze spec (or a manifest) and the BatchNorm modes.

    Raises before anything is written when the spec, a stage, an lr_mult
    selector or the init file is wrong.
    """
    model = build_model(config, pretrained=pretrained)
    if init is not None:
        load_init(model, init, config["init"])
    if sync_bn:
        # Before the BatchNorm modes, so layers they fix stay in eval mode and
        # never synchronise: only BatchNorm that trains pays for the all-reduce.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if freeze_from is not None:
        state = read_manifest(model, freeze_from)
        apply(model, state)
    else:
        state = freeze(model, freeze_spec(config), config["freeze"]["bn_modes"], "freeze.patterns")
    check_stages(model, parse_stages(config["unfreeze"]["stages"]))
    lr_factors(model, config)
    if config["train"]["grad_checkpointing"]:
        checkpoint_blocks(model)
    return model, state


def freeze_spec(config: dict) -> list[Selector]:
    return list(config["freeze"]["patterns"])


def read_manifest(model: nn.Module, path: str | Path) -> FreezeState:
    """--freeze-from: the freeze state another run wrote to freeze_manifest.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--freeze-from {path}: cannot read a JSON manifest ({err})") from None
    state = state_from_manifest(model, data, str(path))
    # The new run's own stages follow; the manifest's count belonged to its run.
    state.stages_done = 0
    return state


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Recompute each block's activations in backward instead of keeping them.

    use_reentrant=False always: the reentrant variant returns no gradients
    for a block whose input does not require grad, which is every block
    behind a frozen prefix. The head (the last block) is left alone; its
    activations are small.
    """
    blocks = blocks_with_parameters(model)[:-1]
    for name in blocks:
        child = model.get_submodule(name)
        forward, contexts = child.forward, functools.partial(_recompute_contexts, child)
        child.forward = functools.partial(activation_checkpoint, forward, use_reentrant=False, context_fn=contexts)
    return blocks


def blocks_with_parameters(model: nn.Module) -> list[str]:
    """The blocks that hold parameters, in depth order; the last holds the head.

    Top-level children, with each container of model.BLOCK_CONTAINERS
    replaced by its children (a ViT's encoder layers, a CNN's stages).
    """

    def expand(prefix: str, module: nn.Module) -> Iterator[str]:
        for name, child in module.named_children():
            if any(True for _ in child.parameters()):
                full = prefix + name
                yield from expand(full + ".", child) if full in BLOCK_CONTAINERS else [full]

    return list(expand("", model))


def _recompute_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), _batchnorm_counts_once(block)


@contextlib.contextmanager
def _batchnorm_counts_once(block: nn.Module) -> Iterator[None]:
    """The recompute runs the block's forward again: BatchNorm must not count the batch twice.

    Its output is the same either way (batch statistics); only the running
    statistics would take a second momentum step, so they are put back,
    also when torch stops the recompute early by raising through here.
    """
    batchnorm = nn.modules.batchnorm._BatchNorm
    training = [m for m in block.modules() if isinstance(m, batchnorm) and m.training and m.track_running_stats]
    saved = [[buffer.clone() for buffer in m.buffers(recurse=False)] for m in training]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, values in zip(training, saved, strict=True):
                for buffer, value in zip(module.buffers(recurse=False), values, strict=True):
                    buffer.copy_(value)


def lr_factors(model: nn.Module, config: dict) -> dict[str, float]:
    """Each parameter's learning-rate multiplier.

    train.layer_decay d gives the last block (the head) 1, the one before
    it d, then d**2, ...; parameters outside every block (a ViT's class
    token) go with the first block. Then train.lr_mult maps selectors
    to multipliers, applied on top, the last matching selector winning.
    """
    train_cfg = config["train"]
    blocks = blocks_with_parameters(model)
    factors = {}
    for name, _ in model.named_parameters():
        index = next((i for i, block in enumerate(blocks) if name.startswith(block + ".")), 0)
        factors[name] = train_cfg["layer_decay"] ** (len(blocks) - 1 - index)
    mults = {name: 1.0 for name in factors}
    for selector, mult in train_cfg["lr_mult"].items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
            raise ConfigError(f"train.lr_mult: {selector!r} = {mult!r}; a multiplier is a number > 0")
        _, match = resolve(model, [selector], f"train.lr_mult {selector!r}")
        mults.update(dict.fromkeys(match.params, float(mult)))
    return {name: factors[name] * mults[name] for name in factors}


def param_groups(
    model: nn.Module,
    config: dict,
    names: list[str],
    label: str,
    lr_mult: float = 1.0,
    start_epoch: int = 0,
    warmup_epochs: int = 0,
) -> list[dict[str, Any]]:
    """Trainable `names` split into as few groups as their lr and weight decay need.

    Groups are JSON data (parameter names, not tensors): freeze_manifest.json
    records them and a resume rebuilds the optimizer from them. Few groups
    keep foreach/fused optimizer kernels batching many tensors per launch.
    """
    train_cfg = config["train"]
    factors = lr_factors(model, config)
    params = dict(model.named_parameters())
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name in names:
        factor = lr_mult * factors[name]
        # Biases and norm scales (every 1-d tensor) decay towards 0, which
        # only fights the normalisation; the usual recipe leaves them alone.
        no_decay = train_cfg["no_decay_norm_bias"] and params[name].ndim <= 1
        decay = 0.0 if no_decay else train_cfg["weight_decay"]
        if (factor, decay) not in groups:
            rate = "" if factor == 1 else f" lr x{factor:g}"
            plain = " no_decay" if no_decay and train_cfg["weight_decay"] else ""
            groups[factor, decay] = {
                "name": label + rate + plain,
                "lr_mult": factor,
                "weight_decay": decay,
                "start_epoch": start_epoch,
                "warmup_epochs": warmup_epochs,
                "params": [],
            }
        groups[factor, decay]["params"].append(name)
    return list(groups.values())


def make_optimizer(model: nn.Module, config: dict, groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, grouped as `groups` says (default: by the config).

    A frozen tensor inside an optimizer still drifts through weight decay and
    momentum even with requires_grad=False, so none is ever added.
    """
    if groups is None:
        groups = param_groups(model, config, trainable_names(model), "trainable")
    lr, params = config["train"]["lr"], dict(model.named_parameters())
    torch_groups = [torch_group(params, group, lr) for group in groups]
    return torch.optim.AdamW(torch_groups, lr=lr, weight_decay=config["train"]["weight_decay"])


def torch_group(params: dict[str, nn.Parameter], group: dict[str, Any], lr: float) -> dict[str, Any]:
    # Everything but the tensors travels in the optimizer's state_dict too.
    meta = {k: v for k, v in group.items() if k != "params"}
    return {**meta, "params": [params[name] for name in group["params"]], "lr": lr * group["lr_mult"]}


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def lr_factor(epochs: int, start_epoch: int, warmup_epochs: int) -> Callable[[int], float]:
    """Cosine from 1 to 0 over the run, times a linear warmup from the group's first epoch.

    With warmup_epochs = w the group's first w epochs get 1/(w+1), 2/(w+1), ...
    of the cosine value, then the cosine value itself.
    """

    def factor(epoch: int) -> float:
        ramp = min(1.0, (epoch - start_epoch + 1) / (warmup_epochs + 1))
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * ramp

    return factor


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR factor per param group, so each group can start and warm up on its own."""
    factors = [lr_factor(epochs, g["start_epoch"], g["warmup_epochs"]) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def add_groups(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    groups: list[dict[str, Any]],
    config: dict,
    epochs: int,
) -> None:
    """Add newly trainable parameters to the optimizer *and* the schedule.

    LambdaLR keeps one base_lr and one factor per group, captured when it was
    built: a group added with add_param_group alone would keep its first lr
    for ever (or break schedulers that index groups). So each new group gets
    its initial_lr, a base_lr and a factor, and starts at the lr the
    schedule gives it for the current epoch.
    """
    params = dict(model.named_parameters())
    for group in groups:
        factor = lr_factor(epochs, group["start_epoch"], group["warmup_epochs"])
        torch_form = torch_group(params, group, config["train"]["lr"])
        base_lr = torch_form["lr"]
        optimizer.add_param_group({**torch_form, "initial_lr": base_lr, "lr": base_lr * factor(scheduler.last_epoch)})
        scheduler.base_lrs.append(base_lr)
        scheduler.lr_lambdas.append(factor)


def make_net(model: nn.Module, world: World, device: torch.device, config: dict) -> nn.Module:
    """What the training step calls: the model, wrapped for DDP and compiled when asked.

    Rebuilt after every unfreeze stage: a DDP wrapper registers only the
    parameters that required grad when it was made, and a compiled graph
    can keep the old requires_grad flags (pytorch#139476), so both go.
    """
    net = wrap(model, world, device)
    if config["train"]["compile"]:
        torch.compiler.reset()
        net = torch.compile(net, backend=config["train"]["compile_backend"])
    return net


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Step through the scaler; skip when no parameter got a gradient.

    GradScaler.step raises "No inf checks were recorded" for an optimizer
    without gradients (a batch that never reaches the trainable part).
    """
    if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
        return False
    scaler.step(optimizer)
    scaler.update()
    return True


def amp_dtype(train_cfg: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full precision.

    CUDA (train.amp): bf16 where the GPU has it (no loss scaling needed),
    else fp16 with GradScaler. CPU (train.cpu_amp, off by default): bf16,
    which pays off only on CPUs with bf16 instructions.
    """
    choice = train_cfg["amp_dtype"]
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if choice != "auto" and choice not in dtypes:
        raise ConfigError(f'train.amp_dtype must be "auto", "bfloat16" or "float16", got {choice!r}')
    if device.type == "cuda" and train_cfg["amp"]:
        if choice == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dtypes[choice]
    if device.type == "cpu" and train_cfg["cpu_amp"]:
        return torch.bfloat16
    return None


def use_channels_last(setting: str | bool, model: nn.Module, device: torch.device) -> bool:
    """With "auto", on for a convolutional model on CUDA, where cuDNN's fastest kernels want NHWC."""
    if setting == "auto":
        return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if not isinstance(setting, bool):
        raise ConfigError(f'train.channels_last must be true, false or "auto", got {setting!r}')
    return setting


def loader_workers(setting: str | int, data: str, world: World) -> int:
    """With "auto", none for in-memory synthetic data; else the cores shared by the processes, up to 8."""
    if setting == "auto":
        return 0 if data == DEFAULT_DATA else min(8, max(1, (os.cpu_count() or 1) // world.size - 1))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f'train.num_workers must be "auto" or an integer >= 0, got {setting!r}')
    return setting


def cache_risks(data: str, config: dict, world: World) -> list[str]:
    """What, besides the model, makes cached features differ from a fresh forward pass."""
    risks = []
    if data != DEFAULT_DATA and config["data"]["augment"]:
        risks.append("training images are randomly augmented ([data] augment = true)")
    if world.distributed:
        risks.append("under torchrun each process sees other samples every epoch")
    return risks


def build_cache(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    sampler: DistributedSampler,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[CachedBatches, CachedBatches]:
    """Head inputs of the whole train and val sets, batched as the loaders would batch them.

    Train features under the training step's autocast, val features without
    it, as evaluate() runs the model.
    """
    train_features, train_labels = head_inputs(model, train_set, batch_size, device, amp)
    val_features, val_labels = head_inputs(model, val_set, batch_size, device, None)
    return (
        CachedBatches(train_features, train_labels, sampler, batch_size),
        CachedBatches(val_features, val_labels, range(len(val_set)), batch_size),
    )


def show_progress(world: World) -> bool:
    """Bars are for a person at a terminal; logs and CI get one line per epoch."""
    return world.main and sys.stderr.isatty() and not os.environ.get("CI")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: torch.dtype | None,
    desc: str | None = None,
    channels_last: bool = False,
) -> tuple[float, int, int]:
    """One pass over `loader`: summed loss, correct predictions and samples of this process.

    `amp` is the autocast dtype (None: full precision). `desc` turns on a
    progress bar with the running loss, accuracy and images/s. `loader` may
    yield images for the whole model or cached features for the head alone.
    """
    model.train()
    # Summed on the device: reading a number every step would wait for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    bar = tqdm(loader, desc=desc, disable=desc is None, leave=False, unit="batch", dynamic_ncols=True)
    started = time.perf_counter()
    for step, (images, labels) in enumerate(bar, 1):
        images, labels = to_device(images, device, channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        # The scaler keeps fp16 gradients from underflowing; disabled it is a no-op.
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        if not bar.disable:
            bar.set_postfix(
                loss=f"{loss_sum.item() / count:.4f}",
                acc=f"{correct.item() / count:.3f}",
                img_s=f"{count / (time.perf_counter() - started):.0f}",
                # Drawn at tqdm's interval, and at the last step: a fast epoch
                # would otherwise end before its numbers were ever shown.
                refresh=step == bar.total,
            )
    return loss_sum.item(), int(correct.item()), count


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    # channels_last lets cuDNN pick its fastest (tensor-core) convolutions.
    if channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    world: World = SINGLE,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over `loader`, summed over every rank's shard."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = to_device(images, device, channels_last), labels.to(device)
        logits = model(images)
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    loss, correct, count = all_sum([loss, correct, count], world, device)
    return loss / count, correct / count


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    # Rewritten whole from the history each epoch, so a resumed run never
    # holds rows from epochs it went back over.
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as data weights_only=True loads."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": None,
    }
    if np is not None:
        # The Generator-style dict of numpy's global RNG, its key as a tensor:
        # a numpy array would need unsafe globals to unpickle.
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
        state["numpy"] = numpy_state
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["numpy"] is not None and np is not None:
        numpy_state = dict(state["numpy"])
        numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}
        np.random.set_state(numpy_state)


def restore_rng(states: list[dict[str, Any]], world: World, fallback_seed: int) -> None:
    """Put back this rank's RNG state; a different number of ranks cannot be matched."""
    if len(states) == world.size:
        set_rng_state(states[world.rank])
        return
    if world.main:
        print(
            f"the checkpoint holds RNG state for {len(states)} processes and this run has {world.size}: "
            "reseeding, so random draws (not the data order) differ from an uninterrupted run"
        )
    seed_everything(fallback_seed + world.rank)


def fit(
    config: dict,
    out: str | Path | None,
    *,
    data: str = DEFAULT_DATA,
    epochs: int | None = None,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    device: str | None = None,
    freeze_from: str | Path | None = None,
) -> list[dict[str, float]]:
    """Train and write the run folder; return one metrics row per epoch.

    `stop_after` ends this invocation after that many epochs, leaving the
    schedule planned for `epochs`: resume later with --resume.
    `resume` is a full checkpoint or a run folder (its newest checkpoint that
    matches checkpoints.json); `out` then defaults to that checkpoint's folder.
    `freeze_from` is a freeze_manifest.json whose freeze state replaces the
    config's spec.
    Under torchrun every process runs this with its share of each batch
    (`train.batch_size` is the global batch); rank 0 alone writes and prints.
    """
    train_cfg = config["train"]
    epochs = epochs or train_cfg["epochs"]
    world, dev = start(device)
    # The model starts the same on every rank; what a step draws (dropout,
    # augmentation) is seeded per rank below.
    seed_everything(train_cfg["seed"])
    # Everything that can reject the input runs before the run folder exists.
    if train_cfg["batch_size"] % world.size:
        raise ConfigError(f"train.batch_size {train_cfg['batch_size']} does not split over {world.size} processes")
    sync_bn = train_cfg["sync_bn"] and world.distributed
    if sync_bn and dev.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA: SyncBatchNorm does not run on CPU; set it to false")
    board_writer = tensorboard_writer() if config["log"]["tensorboard"] and world.main else None
    monitor, mode = config["checkpoint"]["monitor"], config["checkpoint"]["mode"]
    if monitor not in MONITORS or mode not in ("min", "max"):
        raise ConfigError(
            f"checkpoint.monitor must be one of {', '.join(MONITORS)} and checkpoint.mode min or max; "
            f"got {monitor!r}, {mode!r}"
        )
    keep_last_k = config["checkpoint"]["keep_last_k"]
    if keep_last_k < 0:
        raise ConfigError(f"checkpoint.keep_last_k must be 0 or more, got {keep_last_k}")
    checkpoint = None
    if resume is not None:
        if freeze_from is not None:
            raise ConfigError("--freeze-from starts a new run and --resume continues one; pass one of them")
        # Rank 0 alone chooses and verifies the file (hashes, fallbacks and
        # what it skipped, printed once); every other rank loads that file.
        chosen: dict[str, Any] = {}

        def choose() -> Path:
            chosen["path"], chosen["checkpoint"] = load_resume(resume)
            return chosen["path"]

        resume = on_main(choose, world)
        checkpoint = chosen["checkpoint"] if world.main else torch_load(resume)
        out = out or resume.parent
    if out is None:
        raise ConfigError("no run folder: pass --out or --resume")
    stages = parse_stages(config["unfreeze"]["stages"])
    bn_overrides = config["freeze"]["bn_modes"]
    model, state = prepare_model(
        config,
        init=init,
        pretrained=config["model"]["pretrained"] and init is None and checkpoint is None,
        sync_bn=sync_bn,
        freeze_from=freeze_from,
    )
    if checkpoint is not None:
        # The freeze state exactly as saved, stages already applied included:
        # re-running the config's spec would freeze a backbone that an
        # earlier stage had released (the failure of re-freezing on resume).
        state = state_from_manifest(model, checkpoint["freeze_manifest"], f"{resume} freeze_manifest")
        apply(model, state)
    train_set, val_set = make_datasets(data, config)
    out = Path(out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        files = RunFiles(out)
        print(freeze_summary(model, state))
    seed_everything(train_cfg["seed"] + world.rank)

    model.to(dev)
    if checkpoint is None:
        groups = param_groups(model, config, trainable_names(model), "trainable")
    else:
        groups = checkpoint["freeze_manifest"]["param_groups"]  # with the groups of stages done
    optimizer = make_optimizer(model, config, groups)
    scheduler = cosine_schedule(optimizer, epochs)
    amp = amp_dtype(train_cfg, dev)
    # Loss scaling keeps fp16 gradients from underflowing; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    channels_last = use_channels_last(train_cfg["channels_last"], model, dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    history: list[dict[str, float]] = []
    first = 0
    best_value = math.inf if mode == "min" else -math.inf
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"] or not scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler"])
        elif world.main:
            # Saved without AMP (on the CPU, or amp = false): no scale to restore.
            print("the checkpoint has no GradScaler state (saved without AMP); the scaler starts fresh")
        first, history = checkpoint["epoch"] + 1, checkpoint["history"]
        restore_rng(checkpoint["rng"], world, train_cfg["seed"] + first)
        best_value = checkpoint["best_value"]
        if world.main:
            print(f"resumed from {resume} after epoch {first - 1}")
        if world.main and first >= epochs and resume.name != "last.ckpt" and resume.resolve().parent == out.resolve():
            # Killed during the final save: the newest valid file is an
            # epoch file, and last.ckpt must not stay behind it.
            files.save("last.ckpt", resume.read_bytes(), full_info(checkpoint))
    if world.main:
        write_json(out / "freeze_manifest.json", manifest(model, state, groups))
    # Built after the freeze (and the stages a resume put back): DDP
    # registers only the parameters that require grad when it is made.
    net = make_net(model, world, dev, config)

    workers = loader_workers(train_cfg["num_workers"], data, world)
    loader_args = {"num_workers": workers, "pin_memory": dev.type == "cuda", "persistent_workers": workers > 0}
    # The shuffle order depends on the seed and the epoch alone (set_epoch is
    # the sampler's whole state), so a resumed run sees exactly the batches an
    # uninterrupted one would, and rank r takes every world.size-th sample of
    # it: together the ranks see the batches one process would.
    sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank, seed=train_cfg["seed"])
    train_loader = DataLoader(train_set, train_cfg["batch_size"] // world.size, sampler=sampler, **loader_args)
    val_shard = Subset(val_set, range(world.rank, len(val_set), world.size))
    val_loader = DataLoader(val_shard, train_cfg["batch_size"], **loader_args)
    board = board_writer(out / "tensorboard", purge_step=first) if board_writer else None
    caching, why = cache_decision(model, train_cfg["cache_features"], cache_risks(data, config, world))
    if world.main:
        print(f"feature cache: {'on' if caching else 'off'} ({why})")
    cache: tuple[CachedBatches, CachedBatches] | None = None
    ran = 0
    for epoch in range(first, epochs):
        while state.stages_done < len(stages) and stages[state.stages_done].epoch <= epoch:
            stage = stages[state.stages_done]
            names = unfreeze_stage(model, state, stage, bn_overrides)
            label = f"stage{state.stages_done}"
            new = param_groups(model, config, names, label, stage.lr_mult, epoch, stage.warmup_epochs)
            add_groups(model, optimizer, scheduler, new, config, epochs)
            groups = groups + new
            net = make_net(model, world, dev, config)
            if world.main:
                write_json(out / "freeze_manifest.json", manifest(model, state, groups))
                print(stage_line(model, epoch, stage, names, new))
            if caching and names:
                caching, cache = False, None
                if world.main:
                    print(f"epoch {epoch}: feature cache dropped, the backbone trains from here")
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        desc = f"epoch {epoch}" if show_progress(world) else None
        if caching and cache is None:
            cache = build_cache(model, train_set, val_set, sampler, train_cfg["batch_size"], dev, amp)
        if cache is not None:
            # Only the head runs: the same batches in the same order, minus the backbone.
            head = model.get_submodule(HEAD)
            sums = train_one_epoch(head, cache[0], optimizer, scaler, dev, amp, desc)
        else:
            sums = train_one_epoch(net, train_loader, optimizer, scaler, dev, amp, desc, channels_last)
        loss_sum, correct, count = all_sum(list(sums), world, dev)
        sync_buffers(model, world)
        check_in_sync(model, world)
        if cache is not None:
            val_loss, val_acc = evaluate(head, cache[1], dev, world)
        else:
            val_loss, val_acc = evaluate(model, val_loader, dev, world, channels_last)
        scheduler.step()
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / count,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": seconds,
            "train_acc": correct / count,
            "images_per_s": count / seconds,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        history.append(row)
        if world.main:
            write_metrics(out / "metrics.csv", history)
            if board is not None:
                for key in METRIC_COLUMNS[1:]:
                    board.add_scalar(key, row[key], epoch)
                board.flush()
            print(
                f"epoch {epoch}: train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.3f} "
                f"val_loss {val_loss:.4f} val_acc {val_acc:.3f} lr {lr:.2e} "
                f"({seconds:.1f}s, {row['images_per_s']:.0f} img/s)"
            )
        value = row[monitor]
        if value < best_value if mode == "min" else value > best_value:
            best_value = value
            if world.main:
                info = {"epoch": epoch, "metric": {monitor: value}}
                weights = model.state_dict()
                # safetensors metadata is str -> str.
                metadata = {"epoch": str(epoch), monitor: repr(value), "config_sha256": config_hash(config)}
                files.save("best.safetensors", safetensors_bytes(weights, metadata), {**info, "format": "safetensors"})
        # Every rank's RNG, so each rank of a resumed run draws what it would have.
        rng = gather(rng_state(), world)
        if world.main:
            checkpoint = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
                "best_value": best_value,
                "history": history,
                "freeze_manifest": manifest(model, state, groups),
                "config": config,
            }
            save_full(files, checkpoint, keep_last_k)
        ran += 1
        if stop_after is not None and ran >= stop_after:
            break
    if board is not None:
        board.close()
    return history


def stage_line(model: nn.Module, epoch: int, stage: Any, names: list[str], groups: list[dict[str, Any]]) -> str:
    """The one line an unfreeze stage prints: what it selected and what changed."""
    picked = ", ".join(map(str, stage.select))
    if not names:
        return f"epoch {epoch}: unfreeze stage {picked}: already trainable, nothing changes"
    released = set(names)
    size = sum(p.numel() for name, p in model.named_parameters() if name in released)
    warmup = f", {stage.warmup_epochs} warmup epochs" if stage.warmup_epochs else ""
    return (
        f"epoch {epoch}: unfreeze stage {picked}: {len(names)} tensors ({size:,} parameters) now train "
        f"in param groups {', '.join(repr(g['name']) for g in groups)} at lr x {stage.lr_mult:g}{warmup}"
    )


def tensorboard_writer() -> Any:
    """SummaryWriter, checked before the run folder exists: log.tensorboard needs the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "log.tensorboard = true needs the tensorboard package: "
            "pip install -e '.[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


def full_info(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What checkpoints.json records for a full checkpoint, read off the checkpoint itself."""
    last = checkpoint["history"][-1]
    return {"epoch": checkpoint["epoch"], "metric": {k: last[k] for k in ("val_loss", "val_acc")}, "format": "full"}


def save_full(files: RunFiles, checkpoint: dict[str, Any], keep_last_k: int) -> None:
    """last.ckpt, plus epoch-NNNN.ckpt files of which the newest keep_last_k stay.

    epoch-0003.ckpt holds the state after epoch 3 (as numbered in
    metrics.csv), so resuming from it runs epoch 4 next. An old epoch file is
    deleted only after the new one is complete.
    """
    payload = torch_bytes(checkpoint)
    info = full_info(checkpoint)
    if keep_last_k:
        files.save(f"epoch-{checkpoint['epoch']:04d}.ckpt", payload, info)
        epoch_files = sorted(name for name in files.files if name.startswith("epoch-"))
        for name in epoch_files[:-keep_last_k]:
            files.remove(name)
    files.save("last.ckpt", payload, info)
