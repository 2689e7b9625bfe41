"""Replay issue 30's red-team cases on a fresh research render and print the tally.

Renders a research small_cnn project (every checkpoint format) into a scratch
folder and runs each case through the project's own command line, as a user
would (`python -m PACKAGE ...`, the render's src/ on PYTHONPATH, nothing
installed). A case passes when the project refuses what it must, in one line
and before anything is written, or does what it must. Prints one line per case
and "N passed, M failed"; the exit status is 1 when a case failed.

    python bench/redteam.py                 # this checkout's template, about 2 minutes on 2 cores
    python bench/redteam.py --src DIR       # another copy of the template (an older commit, say)
    python bench/redteam.py --only lock     # the cases whose name holds "lock"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from scaffold.render import render  # noqa: E402

PACKAGE = "redteam_render"
CASES: dict[str, Callable[[Path], str | None]] = {}  # name -> case; a case returns None, or what went wrong


def case(function: Callable[[Path], str | None]) -> Callable[[Path], str | None]:
    CASES[function.__name__] = function
    return function


class Project:
    """The rendered project, run as its console script would be."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PYTHONPATH": str(root / "src"), "CI": "true", "OMP_NUM_THREADS": "1"}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", PACKAGE, *args]
        try:
            return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, -1, "", f"still running after {timeout:.0f} s")

    def start(self, *args: str) -> subprocess.Popen:
        command = [sys.executable, "-m", PACKAGE, *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)


PROJECT: Project
SMALL = ["--set", "data.synthetic_train_size=64", "--set", "data.synthetic_val_size=32", "--set", "train.batch_size=32"]


def train(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`train --out OUT --device cpu ARGS` on the small synthetic set; each `--set K=V` in ARGS goes before `train`."""
    sets = [i for i, arg in enumerate(args) if arg == "--set"]
    options = [part for i in sets for part in args[i : i + 2]]
    rest = [arg for i, arg in enumerate(args) if i not in sets and i - 1 not in sets]
    return PROJECT.run(*SMALL, *options, "train", "--out", str(out), "--device", "cpu", *rest, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str | None:
    """None when the process exited 2 with one line holding every word; else what it did."""
    err = proc.stderr.strip()
    if proc.returncode == 2 and len(err.splitlines()) == 1 and all(word in err for word in words):
        return None
    return f"exit {proc.returncode}: {err.splitlines()[-1] if err else '(no stderr)'}"[:300]


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def image_folder(root: Path, per_class: int = 3, classes: int = 10, seed: int = 0) -> Path:
    """root/train/kindK and root/val/kindK of small random PNGs (the model has 10 classes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(classes):
            folder = root / split / f"kind{k}"  # not class_k: the synthetic set's names
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def one_folder(root: Path, per_class: int = 4) -> Path:
    image_folder(root / "tmp", per_class=per_class)
    (root / "tmp" / "train").rename(root / "all")
    return root / "all"


# --- 1-4: files outside the run -------------------------------------------


@case
def lock_symlink_is_not_followed(tmp: Path) -> str | None:
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")
    out = tmp / "runs" / "r"
    out.mkdir(parents=True)
    (out / ".lock").symlink_to(victim)
    proc = train(out, "--epochs", "1")
    if victim.read_text() != "precious\n":
        return f"the victim now holds {victim.read_text()!r}"
    return refused(proc, "symbolic link")


@case
def checkpoints_json_path_deletes_nothing_outside(tmp: Path) -> str | None:
    victim = tmp / "victim3.txt"
    victim.write_text("precious\n")
    out = tmp / "a" / "b" / "run"
    train(out, "--epochs", "3", "--stop-after", "1")
    (out / "epoch-").mkdir()
    manifest = json.loads((out / "checkpoints.json").read_text())
    manifest["files"]["epoch-/../../../victim3.txt"] = dict(manifest["files"]["last.ckpt"], format="state_dict")
    (out / "checkpoints.json").write_text(json.dumps(manifest))
    proc = PROJECT.run("train", "--resume", str(out))
    if not victim.exists():
        return "pruning deleted a file outside the run"
    return refused(proc, "not a plain file name")


@case
def two_writers_never_mix(tmp: Path) -> str | None:
    out = tmp / "race"
    first = PROJECT.start(*SMALL, "train", "--epochs", "2", "--out", str(out), "--device", "cpu")
    time.sleep(0.05)
    # Its data takes longer to make than the first run takes to finish: it looked while the folder was empty.
    late = PROJECT.run(
        "--set", "data.synthetic_train_size=60000", "--set", "train.lr=0.05",
        "train", "--epochs", "1", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    first.communicate(timeout=300)
    if late.returncode == 0:
        return "both runs exited 0 in one folder"
    return refused(late, str(out))


@case
def resume_with_overwrite_is_refused(tmp: Path) -> str | None:
    out = tmp / "run"
    train(out, "--epochs", "2", "--stop-after", "1")
    before = listing(out)
    proc = PROJECT.run("train", "--resume", str(out), "--overwrite")
    if listing(out) != before:
        return "the run was changed"
    return refused(proc, "--overwrite")


# --- 5-10: a resume is the run that was started ----------------------------


@case
def resume_on_other_data_is_refused(tmp: Path) -> str | None:
    images, other = image_folder(tmp / "imgs"), image_folder(tmp / "other", seed=1)
    out = tmp / "run"
    train(out, "--epochs", "3", "--stop-after", "1", "--data", str(images), "--set", "train.image_size=16")
    return refused(PROJECT.run("train", "--resume", str(out), "--data", str(other)), "was trained on")


@case
def printed_resume_command_works_on_an_image_run(tmp: Path) -> str | None:
    images = image_folder(tmp / "imgs")
    out = tmp / "run"
    train(out, "--epochs", "2", "--stop-after", "1", "--data", str(images), "--set", "train.image_size=16")
    proc = PROJECT.run("train", "--resume", str(out))
    return None if proc.returncode == 0 else refused(proc, "(exit 0 expected)")


@case
def evaluate_run_uses_the_run_s_data(tmp: Path) -> str | None:
    images = image_folder(tmp / "imgs")
    out = tmp / "run"
    train(out, "--epochs", "1", "--data", str(images), "--set", "train.image_size=16")
    proc = PROJECT.run("evaluate", "--run", str(out))
    return None if proc.returncode == 0 else refused(proc, "(exit 0 expected)")


@case
def edited_split_json_is_refused(tmp: Path) -> str | None:
    root = one_folder(tmp)
    out = tmp / "run"
    train(out, "--epochs", "2", "--stop-after", "1", "--data", str(root), "--set", "train.image_size=16")
    split = json.loads((out / "split.json").read_text())
    split["train"] += split["val"]
    (out / "split.json").write_text(json.dumps(split))
    return refused(PROJECT.run("train", "--resume", str(out)), "split.json")


@case
def symlink_loop_in_a_class_folder_is_refused(tmp: Path) -> str | None:
    images = image_folder(tmp / "imgs")
    (images / "train" / "kind0" / "a").symlink_to("..")
    out = tmp / "run"
    proc = train(out, "--epochs", "1", "--data", str(images), "--set", "train.image_size=16")
    if out.exists():
        return "the run folder was made"
    return refused(proc, "kind0/a", "loop")


@case
def two_symlink_loops_do_not_hang(tmp: Path) -> str | None:
    images = image_folder(tmp / "imgs")
    (images / "train" / "kind0" / "a").symlink_to("..")
    (images / "train" / "kind1" / "b").symlink_to("..")
    proc = train(tmp / "run", "--epochs", "1", "--data", str(images), "--set", "train.image_size=16", timeout=120)
    return refused(proc, "loop")


@case
def init_of_integer_tensors_is_refused(tmp: Path) -> str | None:
    import torch

    sys.path.insert(0, str(PROJECT.root / "src"))
    from redteam_render.config import load_config
    from redteam_render.model import build_model

    state = build_model(load_config()).state_dict()
    bad = {k: (v * 1e6).to(torch.int64) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(bad, tmp / "int64.pt")
    return refused(train(tmp / "run", "--epochs", "1", "--init", str(tmp / "int64.pt")), "int64")


@case
def package_name_shadowing_a_dependency_is_refused(tmp: Path) -> str | None:
    for name in ("tqdm", "numpy", "tomli_w", "peft", "onnx", "matplotlib", "pathlib"):
        try:
            render(tmp / name, {"project_name": "x", "package_name": name, "backbone": "small_cnn"}, src=SOURCE)
        except ValueError as err:
            if "would shadow" not in str(err):
                return f"{name}: refused for another reason: {err}"
            continue
        return f"package_name={name} rendered"
    return None


# --- 11: half-made run folders ---------------------------------------------


@case
def bogus_compile_backend_leaves_no_folder(tmp: Path) -> str | None:
    out = tmp / "run"
    proc = train(out, "--epochs", "1", "--set", "train.compile=true", "--set", "train.compile_backend='bogus'")
    return "a run folder was left" if out.exists() else refused(proc, "compile_backend")


@case
def devices_it_cannot_train_on_leave_no_folder(tmp: Path) -> str | None:
    for device in ("meta", "mps", "xla"):
        out = tmp / device
        proc = PROJECT.run(*SMALL, "train", "--epochs", "1", "--out", str(out), "--device", device)
        problem = refused(proc, device)
        if problem or out.exists():
            return f"--device {device}: {problem or 'a run folder was left'}"
    return None


@case
def a_diverged_first_epoch_lets_a_plain_retry_run(tmp: Path) -> str | None:
    out = tmp / "run"
    first = train(out, "--epochs", "1", "--set", "train.lr=1e30")
    if first.returncode != 2:
        return f"the diverging run exited {first.returncode}"
    retry = train(out, "--epochs", "1")
    return None if retry.returncode == 0 else refused(retry, "(a retry should run)")


@case
def overwrite_with_a_linked_tensorboard_store(tmp: Path) -> str | None:
    out = tmp / "run"
    train(out, "--epochs", "1")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    proc = train(out, "--epochs", "1", "--overwrite")
    if not (elsewhere / "keep.txt").exists():
        return "deleted what the link pointed to"
    return None if proc.returncode == 0 else refused(proc, "(exit 0 expected)")


# --- 13-19: one line, not a traceback ---------------------------------------


@case
def out_of_range_seeds_are_one_line(tmp: Path) -> str | None:
    for seed in ("-1", str(2**32), str(2**63 - 1)):
        problem = refused(train(tmp / seed, "--epochs", "1", "--set", f"train.seed={seed}"), "train.seed")
        if problem:
            return f"seed {seed}: {problem}"
    return None


@case
def huge_sizes_are_one_line(tmp: Path) -> str | None:
    for key in ("model.num_classes", "train.image_size", "data.synthetic_train_size"):
        value = "1000000" if key == "train.image_size" else "100000000000"
        problem = refused(train(tmp / key, "--epochs", "1", "--set", f"{key}={value}"), key)
        if problem:
            return f"{key}={value}: {problem}"
    return None


@case
def a_checkpoints_json_epoch_that_is_not_a_number(tmp: Path) -> str | None:
    out = tmp / "run"
    train(out, "--epochs", "2", "--stop-after", "1")
    manifest = json.loads((out / "checkpoints.json").read_text())
    for bad in (None, "zero", "missing"):
        entry = manifest["files"]["last.ckpt"]
        if bad == "missing":
            entry.pop("epoch", None)
        else:
            entry["epoch"] = bad
        (out / "checkpoints.json").write_text(json.dumps(manifest))
        problem = refused(PROJECT.run("train", "--resume", str(out)), "checkpoints.json")
        if problem:
            return f"epoch {bad!r}: {problem}"
    return None


@case
def a_full_checkpoint_missing_its_parts(tmp: Path) -> str | None:
    import torch

    out = tmp / "run"
    train(out, "--epochs", "2", "--stop-after", "1")
    full = torch.load(out / "last.ckpt", weights_only=True)
    for damage in ("freeze_manifest", "model", "history", "rng", "scheduler", "epoch"):
        checkpoint = dict(full)
        if damage == "epoch":
            checkpoint["epoch"] = "zero"
        else:
            del checkpoint[damage]
        torch.save(checkpoint, tmp / f"{damage}.ckpt")
        problem = refused(PROJECT.run("train", "--resume", str(tmp / f"{damage}.ckpt"), "--out", str(tmp / damage)))
        if problem:
            return f"without {damage}: {problem}"
    return None


@case
def unwritable_and_odd_out_paths(tmp: Path) -> str | None:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "run"):
        problem = refused(train(out, "--epochs", "1"), str(a_file))
        if problem:
            return f"--out {out}: {problem}"
    problem = refused(PROJECT.run("--config", str(tmp), "layers"), str(tmp))
    return f"--config DIR: {problem}" if problem else None


@case
def a_section_that_is_not_a_table(tmp: Path) -> str | None:
    (tmp / "c.toml").write_text("model = 5\n")
    return refused(PROJECT.run("--config", str(tmp / "c.toml"), "layers"), "must be a table")


@case
def deeply_nested_set_value(tmp: Path) -> str | None:
    value = "[" * 3000 + "]" * 3000
    return refused(PROJECT.run("--set", f"train.lr={value}", "layers"), "train.lr")


def main() -> int:
    global PROJECT, SOURCE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="the template to render (default: this checkout)")
    parser.add_argument("--only", default="", help="run the cases whose name holds this text")
    args = parser.parse_args()
    SOURCE = args.src
    scratch = scratch_dir("redteam-")
    answers = {"project_name": "redteam-render", "backbone": "small_cnn", "checkpoint_formats": ["state_dict", "full"]}
    PROJECT = Project(render(scratch / "project", answers, src=SOURCE))
    passed = failed = 0
    for name, run_case in CASES.items():
        if args.only not in name:
            continue
        folder = scratch / name
        folder.mkdir()
        started = time.perf_counter()
        try:
            problem = run_case(folder)
        except Exception as err:  # noqa: BLE001 - a case that crashes is a failed case, with its reason
            problem = f"the case crashed: {type(err).__name__}: {err}"[:300]
        seconds = time.perf_counter() - started
        passed, failed = passed + (problem is None), failed + (problem is not None)
        why = "" if problem is None else f": {problem}"
        print(f"{'pass' if problem is None else 'FAIL'}  {name} ({seconds:.0f} s){why}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


SOURCE = ROOT

if __name__ == "__main__":
    sys.exit(main())
