"""The command line of linear_probe_small_cnn.

Commands: layers, inspect-weights, train, lr-find, evaluate, predict, export, plot, plan, suggest.
`linear_probe_small_cnn COMMAND --help` says more.

This module only parses; commands.py does the work. It imports nothing that
imports torch, so `--help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .config import DEFAULT_DATA, EXPORT_FORMATS

# A spec in this model's own names, for --help.
SPEC_EXAMPLE = "block1, !head"


def at_least_one(text: str) -> int:
    """A count (epochs, images): a whole number >= 1 (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linear_probe_small_cnn", description=__doc__)
    add_config_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    layers = commands.add_parser("layers", help="list children, modules and parameters with their freeze state")
    layers.add_argument("--json", action="store_true", help="print JSON instead of tables")
    layers.add_argument(
        "--spec",
        action="append",
        metavar="SELECTORS",
        help=f"dry run: what these selectors match (comma-separated; repeatable), e.g. --spec '{SPEC_EXAMPLE}'",
    )

    inspect = commands.add_parser("inspect-weights", help="plan loading a weights file as --init would, load nothing")
    inspect.add_argument("file", help=".pt, .pth, .bin, .ckpt or .safetensors")

    add_train_command(commands)
    add_lr_find_command(commands)
    add_advisor_commands(commands)

    add_inference_commands(commands)

    ex = commands.add_parser("export", help="export saved weights for inference and check them against eager")
    add_weights_source(ex, "best.pt, best.safetensors or last.ckpt")
    ex.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    ex.add_argument("--out", required=True, help="file to write")
    ex.add_argument(
        "--fold-bn", action="store_true", help="fold each BatchNorm that follows a convolution into it first"
    )

    plot = commands.add_parser("plot", help="draw a run folder's metrics.csv as DIR/curves.png")
    plot.add_argument("dir", help="run folder")
    for command in commands.choices.values():
        add_config_options(command, after_command=True)
    return parser


def add_config_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """--config and --set, before the command or after it (config_source merges the --set lists)."""
    # After the command the defaults are left unset, so the values given before it stay.
    parser.add_argument(
        "--config", default=argparse.SUPPRESS if after_command else None, help="TOML file over the packaged config.toml"
    )
    parser.add_argument(
        "--set",
        action="append",
        dest="set_after" if after_command else "set",
        default=argparse.SUPPRESS if after_command else [],
        metavar="SECTION.KEY=VALUE",
        help="override one key after --config; the value is TOML (--set train.lr=3e-4); repeatable",
    )


def add_weights_source(parser: argparse.ArgumentParser, weights_help: str) -> None:
    """--weights FILE or --run RUN, one of them: what evaluate, predict and export read."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help=weights_help)
    source.add_argument("--run", help="a run folder: its best weights and, without --config, its config.toml")


def add_inference_commands(commands: argparse._SubParsersAction) -> None:
    """evaluate and predict: what saved weights do."""
    ev = commands.add_parser("evaluate", help="loss and accuracy of saved weights")
    add_weights_source(ev, "best.pt, best.safetensors or last.ckpt")
    ev.add_argument("--data", help=f"default: the data the run trained on (its data.json), else {DEFAULT_DATA}")
    ev.add_argument("--device")
    ev.add_argument("--out", help="folder to write per_class.csv and confusion.csv (and confusion.png) into")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object, for scripts")

    pr = commands.add_parser("predict", help="classify image files or folders with saved weights")
    add_weights_source(
        pr,
        "best.pt, best.safetensors or last.ckpt, or a .pt2, .onnx or TorchScript export; class names come with it",
    )
    pr.add_argument("paths", nargs="+", metavar="PATH", help="an image file, or a folder searched recursively")
    pr.add_argument("--top-k", type=at_least_one, default=1, help="the K most probable classes of each image")
    pr.add_argument("--out", help="write a CSV (path,rank,label,probability) instead of the table")
    pr.add_argument("--batch-size", type=at_least_one, help="images per batch (default: train.batch_size)")
    pr.add_argument("--device")


def add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="fine-tune and write a run folder")
    train.add_argument("--out", help="run folder to write (default with --resume: the resumed run's folder)")
    train.add_argument("--epochs", type=at_least_one, help="total epochs (default: train.epochs in the config)")
    train.add_argument(
        "--data",
        help="'synthetic' (the default; with --resume, the run's own data), or a folder (train/ and val/, or classes)",
    )
    train.add_argument("--init", help="weights to start from (.pt, .pth, .bin, .ckpt, .safetensors)")
    train.add_argument(
        "--resume", help="a run folder (its newest checkpoint that matches checkpoints.json) or one full checkpoint"
    )
    train.add_argument("--stop-after", type=at_least_one, help="stop this invocation after N epochs")
    train.add_argument(
        "--overwrite", action="store_true", help="delete the run that --out holds and start over (never mixes two runs)"
    )
    train.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    train.add_argument(
        "--freeze-from", help="freeze_manifest.json of another run: its freeze state replaces the config's spec"
    )


def add_lr_find_command(commands: argparse._SubParsersAction) -> None:
    lr = commands.add_parser(
        "lr-find", help="a learning-rate range test over the param groups train would use; it changes nothing"
    )
    lr.add_argument("--out", required=True, help="folder for lr_find.csv and lr_find.png (not a run folder)")
    lr.add_argument("--data", default=DEFAULT_DATA)
    lr.add_argument("--init", help="weights to start from, as train --init")
    lr.add_argument("--freeze-from", help="freeze_manifest.json of another run, as train --freeze-from")
    lr.add_argument(
        "--stage", type=int, default=0, help="test the groups once the first K unfreeze stages started (default 0)"
    )
    lr.add_argument("--start", type=float, default=1e-7, help="the first lr (default 1e-7)")
    lr.add_argument("--end", type=float, default=10.0, help="the last lr, unless the loss blows up first (default 10)")
    lr.add_argument("--steps", type=at_least_one, default=100, help="batches, one per lr (default 100, at least 20)")
    lr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    lr.add_argument("--overwrite", action="store_true", help="replace the lr_find.csv that --out holds")


def add_advisor_commands(commands: argparse._SubParsersAction) -> None:
    for name, text in (
        ("plan", "measure each choice of what to freeze on a few batches: trainable share, memory, step time"),
        ("suggest", "rank the blocks by how much the data moves them (relative gradient norm), and a spec"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--data", default=DEFAULT_DATA, help=f"'{DEFAULT_DATA}' (the default) or a folder, as train's")
        sub.add_argument("--batches", type=int, default=5, help="training batches to measure on (default 5)")
        sub.add_argument("--init", help="weights to start from, as train --init")
        sub.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "suggest":
            sub.add_argument("--top", type=int, default=1, help="blocks the spec trains besides the head (default 1)")


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # Imported once the arguments parse, not at the top: torch's import takes
    # about 2 s, which `--help` and a mistyped flag should not wait for.
    from .commands import run

    return run(args)
