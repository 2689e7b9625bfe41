"""How long a research render's command line takes to answer, beside torch's import.

Renders the research default (resnet18), then times whole processes, in turn,
--runs times each after one warm-up:

  a  `python -m PKG train --help`: parsing only; cli.py imports no torch
  b  `python -c "import torch"`: what every command paid before it answered
     when cli.py imported the commands at its top
  c  `python -m PKG layers --json`: a real command, torch and the model included

Prints the medians and a / b, c / b; writes bench/results/cli_startup.json.

    python bench/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from scaffold.render import render  # noqa: E402

PACKAGE = "bench_cli"


def wall(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    project = render(scratch_dir("cli-bench-") / "project", {"project_name": PACKAGE, "backbone": "resnet18"}, src=ROOT)
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    commands = {
        "help": [sys.executable, "-m", PACKAGE, "train", "--help"],
        "import_torch": [sys.executable, "-c", "import torch"],
        "layers": [sys.executable, "-m", PACKAGE, "layers", "--json"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(args.runs + 1):
        for name, command in commands.items():
            took = wall(command, env)
            if round_:  # the first round warms the page cache and writes the .pyc files
                seconds[name].append(took)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    import torch

    result = {
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "median_seconds": median,
        "ratio_help_over_import_torch": median["help"] / median["import_torch"],
        "ratio_layers_over_import_torch": median["layers"] / median["import_torch"],
    }
    for name, value in median.items():
        print(f"{name:>14}: {value:.3f} s")
    print(f"help / import torch: {result['ratio_help_over_import_torch']:.3f}")
    print(f"layers / import torch: {result['ratio_layers_over_import_torch']:.2f}")
    out = ROOT / "bench" / "results" / "cli_startup.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
