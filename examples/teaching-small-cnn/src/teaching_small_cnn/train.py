"""Fine-tune small_cnn: the training step, the run, what it saves, and the commands.

Read it top to bottom: `train_one_epoch` is the step, `fit` is a run (build,
load, freeze, loop, save), `main` is the command line. What trains is
decided in freeze.py, the files are written by checkpoint.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import tomli_w
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint, freeze
from .config import Config, UserError, load_config
from .data import DEFAULT_DATA, datasets
from .model import build_model

# The files a run folder holds; --overwrite removes these names and nothing else.
RUN_FILES = ("best.pt", "best.safetensors", "last.ckpt", "metrics.csv", "config.toml", "freeze_manifest.json")


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: str) -> float:
    """One pass over the training data; returns the mean loss."""
    # Fixed BatchNorm layers stay in eval mode here: freeze.py made their train() mean eval().
    model.train()
    total, seen = 0.0, 0
    for step, (inputs, labels) in enumerate(loader):
        inputs, labels = inputs.to(device), labels.to(device)
        loss = F.cross_entropy(model(inputs), labels)
        if not torch.isfinite(loss):
            raise UserError(f"the loss is {loss.item()} at step {step}; this epoch is not saved; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, seen = total + loss.item() * len(labels), seen + len(labels)
    return total / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str) -> tuple[float, float]:
    """(mean loss, accuracy) on the validation data."""
    model.eval()
    total, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return total / seen, correct / seen


def learning_rate(config: Config, epoch: int) -> float:
    """A cosine from train.lr down to a tenth of it at the last epoch.

    A function of the epoch, written into every param group each epoch: a
    group added by an unfreeze stage follows it at once, and a resume needs
    no scheduler state.
    """
    progress = epoch / max(config.train.epochs - 1, 1)
    return config.train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loader(dataset: Dataset, config: Config, epoch: int) -> DataLoader:
    # The shuffle order is a function of the seed and the epoch, so a resumed run sees the same batches.
    order = torch.Generator().manual_seed(config.train.seed * 1000 + epoch)
    return DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True, generator=order)


def fit(config: Config, out: Path, data: str = DEFAULT_DATA, init: str | None = None, device: str = "cpu",
        resume: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Train from epoch 0, or from where `resume` (a last.ckpt) stopped; return the metrics of each epoch."""
    random.seed(config.train.seed)
    torch.manual_seed(config.train.seed)  # the CPU generator and every CUDA device's
    train_set, val_set, classes = datasets(data, config)
    # What trained this run is recorded with it; a resume on other data is refused.
    record = {"data": data, "classes": classes, "sizes": [len(train_set), len(val_set)]}
    if resume and any(resume[key] != value for key, value in record.items()):
        raise UserError(f"--data {data} is not the data this run trained on (its classes or sizes differ)")
    model = build_model(config)
    if init:
        report = checkpoint.load_matching(
            model, checkpoint.read_state_dict(init), config.init.min_loaded_fraction, config.init.first_n
        )
        print(f"--init {init}: {checkpoint.summary(report)}")
    start = resume["epoch"] + 1 if resume else 0
    # Every stage is resolved now, so a typo fails before epoch 0, not at its epoch.
    freeze.param_groups(model, config, len(config.freeze.stages))
    groups = freeze.param_groups(model, config, freeze.stages_before(config, start))
    model.to(device)
    optimizer = freeze.make_optimizer(model, config, groups)
    history: list[dict[str, float]] = []
    best = -1.0
    if resume:
        history, best = restore(resume, model, optimizer)
    val_loader = DataLoader(val_set, batch_size=config.train.batch_size)
    for epoch in range(start, config.train.epochs):
        for k, stage in enumerate(config.freeze.stages):
            if stage.epoch == epoch:
                released = freeze.release_stage(model, optimizer, config, k)
                print(f"epoch {epoch}: stage {k} releases {len(released)} tensors at lr x {stage.lr_mult}")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch) * group["lr_mult"]
        train_loss = train_one_epoch(model, train_loader(train_set, config, epoch), optimizer, device)
        val_loss, val_acc = evaluate(model, val_loader, device)
        history.append({"epoch": epoch, "lr": learning_rate(config, epoch), "train_loss": train_loss,
                        "val_loss": val_loss, "val_acc": val_acc})
        improved, best = val_acc > best, max(best, val_acc)
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rng_state(), "config": config.to_dict(), "history": history, "best": best, **record}
        save_epoch(out, model, state, improved)
        print(f"epoch {epoch}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.3f}"
              f"{'  (best, saved)' if improved else ''}  {freeze.freeze_summary(model)}")
    return history


def save_epoch(out: Path, model: nn.Module, state: dict[str, Any], improved: bool) -> None:
    """What an epoch leaves in the run folder, each file replaced whole."""
    out.mkdir(parents=True, exist_ok=True)  # made at the first save: a run that fails before leaves nothing
    if state["epoch"] == 0:  # an --overwrite run's old files go now, once every check has passed
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)  # a link itself, never what it points to
    checkpoint.atomic_write(out / "config.toml", tomli_w.dumps(state["config"]).encode())
    manifest = freeze.freeze_record(model, state["epoch"])
    checkpoint.atomic_write(out / "freeze_manifest.json", json.dumps(manifest, indent=1).encode())
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(state["history"][0]))
    writer.writeheader()
    writer.writerows(state["history"])
    checkpoint.atomic_write(out / "metrics.csv", table.getvalue().encode())
    if improved:
        checkpoint.save_weights(out / "best.pt", model)
        checkpoint.save_safetensors(out / "best.safetensors", model)
    # Written last: a run stopped before this point resumes from the epoch before.
    checkpoint.atomic_write(out / "last.ckpt", checkpoint.torch_bytes(state))


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from (dropout, augmentation), so a resume continues them exactly."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, float]:
    """Put back what the next step depends on: the weights, the optimizer's moments, every RNG."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["history"], state["best"]


# The command line
def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a run folder that holds a run, unless --overwrite (save_epoch removes it, at the new run's first save)."""
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a link or a file; name a new folder")
    held = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    if held and not overwrite:
        raise UserError(f"--out {out} already holds a run ({', '.join(held)}); --overwrite starts it again")


def pick_device(name: str | None) -> str:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name.startswith("cuda") and torch.cuda.is_available()):
        raise UserError(f"--device {name}: allowed here: cpu{', cuda' if torch.cuda.is_available() else ''}")
    return name


def cmd_train(args: argparse.Namespace, config: Config) -> None:
    out = Path(args.out)
    device = pick_device(args.device)
    check_out(out, args.overwrite)
    fit(config, out, args.data or DEFAULT_DATA, args.init, device)
    print(f"the run is in {out}; {sys.argv[0].rpartition('/')[2]} layers shows what it froze")


def cmd_resume(args: argparse.Namespace) -> None:
    """Continue the run in RUN from its last.ckpt, with its own config and data."""
    from .config import config_from_dict

    if args.overwrite or args.init or args.config or args.set:
        raise UserError("--resume continues a run as it started: it takes no --overwrite, --init, --config or --set")
    out = Path(args.resume)
    state = checkpoint.load_full(out / "last.ckpt")
    if args.data and args.data != state["data"]:
        raise UserError(f"--resume {out}: the run trained on --data {state['data']}, not {args.data}")
    if args.epochs is not None:
        state["config"]["train"]["epochs"] = args.epochs
    config = config_from_dict(state["config"])  # checked again, with the new epochs
    fit(config, out, state["data"], None, pick_device(args.device), resume=state)


def cmd_layers(args: argparse.Namespace, config: Config) -> None:
    model = build_model(config)
    freeze.param_groups(model, config, freeze.stages_before(config, args.epoch + 1))
    print(freeze.layers_table(model))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teaching_small_cnn", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a TOML file of settings (config.py lists every key)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one setting: train.lr=0.003")
    commands = p.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model; writes a run folder")
    train.add_argument("--out", help="the run folder to write (required unless --resume)")
    train.add_argument("--data", help=f"{DEFAULT_DATA} (the default) or a folder with train/ and val/")
    train.add_argument("--epochs", type=int, help="train.epochs for this run")
    train.add_argument("--init", help="start from these weights (.pt or .safetensors); prints what loaded")
    train.add_argument("--overwrite", action="store_true", help="start again in a folder that holds a run")
    train.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    train.add_argument("--resume", metavar="RUN", help="continue RUN from its last.ckpt")
    layers = commands.add_parser("layers", help="every parameter, and whether it trains")
    layers.add_argument("--epoch", type=int, default=0, help="the freeze state this epoch trains in")
    commands.add_parser("traps", help="each blog habit beside this project's code, with the numbers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "train" and args.resume:
            cmd_resume(args)
            return 0
        epochs = [f"train.epochs={args.epochs}"] if getattr(args, "epochs", None) is not None else []
        config = load_config(args.config, args.set + epochs)
        if args.command == "train" and not args.out:
            raise UserError("train needs --out RUN (a new folder), or --resume RUN")
        if args.command == "traps":
            from .traps import print_traps

            print_traps(config, fit)
            return 0
        (cmd_train if args.command == "train" else cmd_layers)(args, config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; the run folder holds the last finished epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
