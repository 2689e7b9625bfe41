"""Save and load time of a generated project's best model: .pt, .pt with mmap, .safetensors.

Renders a project for each backbone the template offers, takes the one with
the most parameters, and times the generated project's own code (atomic
write, fsync, SHA-256 manifest; weights_only load with its CRC check) next to
the bare torch/safetensors calls, in one process and one run, so the ratios
compare like with like.

    python bench/checkpoint_io.py [--repeat 15] [--out bench/results/checkpoint_io.json]

"Cold" loads evict the file from the page cache first (posix_fadvise
DONTNEED after an fsync, which needs no root); "warm" loads read it from
memory. Every load includes `model.load_state_dict`, which is where an mmap
load pays for the pages it did not read up front.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scaffold.render import render  # noqa: E402


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median_ms(fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> float:
    fn()  # warm-up: imports, allocator
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def largest_project(workdir: Path) -> tuple[str, ModuleType, ModuleType]:
    """(backbone, its checkpoint module, its model module) for the backbone with the most parameters."""
    best = None
    # The two backbones the recorded results were measured on.
    for backbone in ("small_cnn", "resnet18"):
        answers = {"backbone": backbone, "package_name": f"bench_{backbone}"}
        answers["checkpoint_formats"] = ["state_dict", "safetensors", "full"]
        dest = render(workdir / backbone, answers)
        sys.path.insert(0, str(dest / "src"))
        package = f"bench_{backbone}"
        config = importlib.import_module(f"{package}.config").load_config()
        model = importlib.import_module(f"{package}.model").build_model(config)
        count = sum(p.numel() for p in model.parameters())
        if best is None or count > best[0]:
            best = (count, backbone, package)
    _, backbone, package = best
    return backbone, importlib.import_module(f"{package}.checkpoint"), importlib.import_module(f"{package}.model")


def default_config(model_module: ModuleType) -> dict:
    return importlib.import_module(model_module.__package__ + ".config").load_config()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_io.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone, ckpt, model_module = largest_project(tmp / "render")
        model = model_module.build_model(default_config(model_module))
        state = model.state_dict()
        size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
        folder = tmp / "run"
        folder.mkdir()
        files = ckpt.RunFiles(folder)
        info = {"epoch": 0, "metric": {"val_acc": 0.0}}
        st_info = {**info, "format": "safetensors"}
        pt, st = folder / "best.pt", folder / "best.safetensors"
        raw_pt, raw_st = tmp / "raw.pt", tmp / "raw.safetensors"

        def into_model(tensors: dict) -> None:
            model.load_state_dict(tensors)

        rows: dict[str, float] = {}
        r = args.repeat
        rows["save .pt: torch.save"] = median_ms(lambda: torch.save(state, raw_pt), r)
        rows["save .pt: generated (atomic, fsync, sha256)"] = median_ms(
            lambda: files.save("best.pt", ckpt.torch_bytes(state), {**info, "format": "state_dict"}), r
        )
        rows["save .safetensors: save_file"] = median_ms(lambda: save_file(state, raw_st), r)
        rows["save .safetensors: generated (atomic, fsync, sha256)"] = median_ms(
            lambda: files.save("best.safetensors", ckpt.safetensors_bytes(state, {}), st_info), r
        )
        loads = {
            ".pt: torch.load(weights_only)": (raw_pt, lambda: into_model(torch.load(raw_pt, weights_only=True))),
            ".pt: torch.load(weights_only, mmap)": (
                raw_pt,
                lambda: into_model(torch.load(raw_pt, weights_only=True, mmap=True)),
            ),
            ".pt: generated read_state_dict (+CRC check)": (pt, lambda: into_model(ckpt.read_state_dict(pt))),
            ".safetensors: load_file": (raw_st, lambda: into_model(load_file(raw_st))),
            ".safetensors: generated read_state_dict": (st, lambda: into_model(ckpt.read_state_dict(st))),
        }
        for name, (path, fn) in loads.items():
            rows[f"load {name}, warm"] = median_ms(fn, r)
            rows[f"load {name}, cold"] = median_ms(fn, r, before=lambda path=path: evict(path))
        verify_ms = median_ms(lambda: files.verify("best.pt"), r)
        rows["verify best.pt against checkpoints.json (sha256)"] = verify_ms

    def base(name: str) -> float:
        if name.startswith("save"):
            return rows["save .pt: torch.save"]
        return rows[f"load .pt: torch.load(weights_only), {'cold' if name.endswith('cold') else 'warm'}"]

    print(f"{backbone}: {size_mb:.1f} MiB of tensors; median of {r} after a warm-up; torch {torch.__version__}")
    print(f"{'operation':<62} {'ms':>9} {'x torch':>8}")
    for name, ms in rows.items():
        print(f"{name:<62} {ms:9.1f} {ms / base(name):8.2f}")
    result = {
        "backbone": backbone,
        "state_dict_mib": round(size_mb, 1),
        "repeat": r,
        "median_ms": {k: round(v, 2) for k, v in rows.items()},
        "ratio_to_torch": {k: round(v / base(k), 3) for k, v in rows.items()},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": "cpu",
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
