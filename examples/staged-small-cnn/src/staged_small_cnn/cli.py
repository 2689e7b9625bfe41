"""Command line: `staged_small_cnn layers | train | evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, read_state_dict
from .config import ConfigError, load_config
from .data import DataError, make_datasets
from .freeze import FreezeSpecError
from .layers import format_layer_table, layer_table
from .model import build_model
from .train import evaluate, fit, pick_device, prepare_model

# Errors that mean "your input is wrong": printed as one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    FreezeSpecError,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="staged_small_cnn", description=__doc__)
    parser.add_argument("--config", help="TOML file overriding the packaged config.toml")
    commands = parser.add_subparsers(dest="command", required=True)

    layers = commands.add_parser("layers", help="list children, modules and parameters with their freeze state")
    layers.add_argument("--json", action="store_true", help="print JSON instead of tables")

    train = commands.add_parser("train", help="fine-tune and write a run folder")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--epochs", type=int, help="total epochs (default: train.epochs in the config)")
    train.add_argument("--data", default="synthetic", help="'synthetic' or an image folder with train/ and val/")
    train.add_argument("--init", help="weights to start from (.pt, .pth, .bin, .ckpt, .safetensors)")
    train.add_argument("--resume", help="last.ckpt of an earlier run to continue")
    train.add_argument("--stop-after", type=int, help="stop this invocation after N epochs")
    train.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")

    ev = commands.add_parser("evaluate", help="loss and accuracy of saved weights")
    ev.add_argument("--weights", required=True, help="best.pt, best.safetensors or last.ckpt")
    ev.add_argument("--data", default="synthetic")
    ev.add_argument("--device")
    return parser


def cmd_layers(args: argparse.Namespace, config: dict) -> int:
    try:
        model, _ = prepare_model(config)
        problem = None
    except USER_ERRORS as err:
        # Show the table anyway: it is what the user needs to fix the spec.
        model, problem = build_model(config["model"]["num_classes"]), err
    table = layer_table(model)
    print(json.dumps(table, indent=2) if args.json else format_layer_table(table))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


def cmd_train(args: argparse.Namespace, config: dict) -> int:
    fit(
        config,
        args.out,
        data=args.data,
        epochs=args.epochs,
        init=args.init,
        resume=args.resume,
        stop_after=args.stop_after,
        device=args.device,
    )
    return 0


def cmd_evaluate(args: argparse.Namespace, config: dict) -> int:
    device = pick_device(args.device)
    model = build_model(config["model"]["num_classes"])
    state = read_state_dict(args.weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{args.weights} does not fit this model: {err}") from None
    _, val_set = make_datasets(args.data, config)
    loader = DataLoader(val_set, batch_size=config["train"]["batch_size"])
    loss, acc = evaluate(model.to(device), loader, device)
    print(json.dumps({"weights": args.weights, "val_loss": loss, "val_acc": acc}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    commands = {"layers": cmd_layers, "train": cmd_train, "evaluate": cmd_evaluate}
    try:
        config = load_config(args.config)
        return commands[args.command](args, config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
