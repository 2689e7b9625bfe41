"""Wall time of a render's own test suite: the default `pytest` and `pytest -m slow`, side by side.

Renders a teaching and a research small_cnn project and a research resnet18
project, then runs each suite in turn, round after round (A B C A B C ...),
so a drift in the machine's speed touches every render alike. Prints the
median seconds and the ratios the README quotes; writes
bench/results/suite_time.json.

    python bench/suite_time.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from scaffold.render import render  # noqa: E402

RENDERS = {
    "teaching small_cnn": {"profile": "teaching", "checkpoint_formats": ["state_dict", "safetensors", "full"]},
    "research small_cnn": {},
    "research resnet18": {"backbone": "resnet18"},
}
RUNS = {"default": [], "slow": ["-m", "slow"]}


def suite_seconds(project: Path, args: list[str]) -> float:
    env = {**os.environ, "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    # Exit 5: no test selected (a teaching render may have no slow test).
    if proc.returncode not in (0, 5):
        raise SystemExit(f"{project}: pytest {' '.join(args)} failed\n{proc.stdout[-3000:]}")
    return seconds if proc.returncode == 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = scratch_dir("suite-time-")
    projects = {name: render(root / name.replace(" ", "-"), data, src=ROOT) for name, data in RENDERS.items()}
    times: dict[str, dict[str, list[float]]] = {name: {run: [] for run in RUNS} for name in RENDERS}
    for round_ in range(args.rounds):
        for name, project in projects.items():
            for run, extra in RUNS.items():
                times[name][run].append(suite_seconds(project, extra))
                print(f"round {round_ + 1}: {name} {run}: {times[name][run][-1]:.1f} s", flush=True)
    median = {name: {run: statistics.median(values) for run, values in runs.items()} for name, runs in times.items()}
    full = {name: sum(runs.values()) for name, runs in median.items()}
    ratios = {
        "teaching default / research small_cnn full": median["teaching small_cnn"]["default"]
        / full["research small_cnn"],
        "teaching default / research resnet18 full": median["teaching small_cnn"]["default"]
        / full["research resnet18"],
        "research small_cnn default / its full": median["research small_cnn"]["default"] / full["research small_cnn"],
        "research resnet18 default / its full": median["research resnet18"]["default"] / full["research resnet18"],
    }
    for name, runs in median.items():
        print(f"{name}: default {runs['default']:.1f} s, slow {runs['slow']:.1f} s (median of {args.rounds})")
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}")
    result = {"rounds": args.rounds, "cpus": os.cpu_count(), "seconds": times, "median": median, "ratios": ratios}
    out = ROOT / "bench" / "results" / "suite_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
