"""`freeze-scaffold new | layers | matrix`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .matrix import format_results, run_matrix
from .render import backbone_answers, complete_answers, package_name, parse_data, render


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeze-scaffold", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    new = commands.add_parser("new", help="render a fine-tuning project (defaults for unanswered questions)")
    new.add_argument("dest")
    new.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help="an answer; repeatable")

    layers = commands.add_parser("layers", help="print a backbone's layer table before generating")
    layers.add_argument(
        "backbone",
        help="a backbone answer (small_cnn, resnet50, ...), timm:<model name>, or module:factory for your own model",
    )
    layers.add_argument("--json", action="store_true")
    layers.add_argument(
        "--spec", action="append", metavar="SELECTORS", help="dry run of a freeze spec on the backbone (repeatable)"
    )

    matrix = commands.add_parser("matrix", help="render a pairwise set of answers and run each project's tests")
    matrix.add_argument("--out", help="keep the rendered projects here (default: a temp dir)")
    matrix.add_argument("--limit", type=int, help="only the first N answer sets")
    matrix.add_argument("--render-only", action="store_true", help="render, do not run the tests")
    return parser


def cmd_new(args: argparse.Namespace) -> int:
    dest = render(args.dest, complete_answers(parse_data(args.data)), quiet=False)
    print(f"rendered {dest}; next: pip install -e {dest} && {package_name(dest)} layers")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    # The table comes from the generated code itself, so it cannot disagree
    # with what a rendered project would print.
    with tempfile.TemporaryDirectory(prefix="freeze-layers-") as tmp:
        answers = {**backbone_answers(args.backbone), "freeze_by": "none", "bn_policy": "train"}
        project = render(Path(tmp) / "p", complete_answers(answers))
        # The current directory too: a custom factory usually lives there.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project / "src"), os.getcwd()])}
        command = [sys.executable, "-m", package_name(project), "layers"] + (["--json"] if args.json else [])
        command += [arg for spec in args.spec or [] for arg in ("--spec", spec)]
        return subprocess.run(command, env=env).returncode


def cmd_matrix(args: argparse.Namespace) -> int:
    results = run_matrix(Path(args.out) if args.out else None, args.limit, args.render_only)
    print(format_results(results))
    return 0 if all(r.passed for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    commands = {"new": cmd_new, "layers": cmd_layers, "matrix": cmd_matrix}
    try:
        return commands[args.command](args)
    except ValueError as err:  # Copier reports a rejected answer as ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
