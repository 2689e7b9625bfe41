"""Export trained weights for inference, and check the export against eager.

Every format is written atomically, loaded back and run on the same batch of
2 as the eager model; the largest difference is printed, and an export that
does not reproduce the model is an error rather than a file you find out
about in production. Each file carries the class names, as a JSON list,
and for an image model how to prepare its input (the image size, resize,
centre crop, interpolation, mean and std it was trained with), as a JSON
object: pt2 and torchscript in extra files `classes.json` and
`preprocessing.json`, onnx in the model's metadata_props under `classes`
and `preprocessing` (export_records reads any of them). predict runs an
export with its own records, so it needs no config.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .batchnorm import fold_batchnorm, plain_batchnorm
from .checkpoint import atomic_path, leftover_temps
from .config import EXPORT_FORMATS
from .data import numbered_classes

# The names of the records inside a pt2 or torchscript file; onnx keys drop the ".json".
CLASSES_FILE = "classes.json"
PREPROCESSING_FILE = "preprocessing.json"
RECORDS = (CLASSES_FILE, PREPROCESSING_FILE)
# fp32 kernels of one model differ in summation order between runtimes; more
# than this on logits means the export computes something else.
TOLERANCE = 1e-3


class ExportError(RuntimeError):
    pass


def export(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    example: torch.Tensor,
    fold_bn: bool = False,
    classes: list[str] | None = None,
    preprocessing: dict | None = None,
) -> float:
    """Write `model` to `out` as `fmt`, traced on `example`; return the max abs difference to eager.

    Any FrozenBatchNorm or fixed-statistics layer becomes plain BatchNorm
    first, so runtimes see a standard op; `fold_bn` then folds each BatchNorm
    that follows a convolution into it. The difference is measured against
    the model as given, so a wrong fold fails like a wrong export. The file
    is checked while it is still a temp file: a failed check leaves an earlier
    `out` as it was. `preprocessing`, when given, is recorded for predict.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    model = plain_batchnorm(model).eval()
    out = Path(out)
    make_room(out, model)
    errors: list[float] = []
    with torch.no_grad():
        expected = model(example)
        if fold_bn:
            fold_batchnorm(model)
        records = {CLASSES_FILE: json.dumps(classes or numbered_classes(expected.shape[1]))}
        if preprocessing is not None:
            records[PREPROCESSING_FILE] = json.dumps(preprocessing)
        write, run = _writer(model, fmt, example, records)

        def check(tmp: Path) -> None:
            error = (run(tmp) - expected).abs().max().item()
            if not error <= TOLERANCE:
                raise ExportError(f"{out}: the {fmt} export differs from eager by {error:.3g} (> {TOLERANCE})")
            errors.append(error)

        with atomic_path(out, before_replace=check) as tmp:
            write(tmp)
    return errors[0]


def make_room(out: Path, model: nn.Module) -> None:
    """Remove temp files an earlier export of `out` left (a killed process), then check the disk can hold it.

    A full disk mid-write aborts torch's pt2 and TorchScript writers in C++
    (no exception to catch), so the space is checked before, at 1.5x the
    model's tensors: both formats store them once, plus the program.
    """
    for path in leftover_temps(out):
        path.unlink()
    tensors = [*model.parameters(), *model.buffers()]
    needed = int(1.5 * sum(t.numel() * t.element_size() for t in tensors)) + 2**20
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise ExportError(
            f"{out}: its disk has {free / 2**20:.1f} MiB free and this export needs about {needed / 2**20:.1f} MiB; "
            "free some space or pass another --out"
        )


def _writer(model: nn.Module, fmt: str, example: torch.Tensor, records: dict) -> tuple[Callable, Callable]:
    """(write the export to a path, run the file at a path on `example`) for one format."""
    # Batch size stays free in the exported graph; everything else is fixed.
    batch = torch.export.Dim("batch", min=1)
    if fmt == "pt2":
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))

        def write(path: Path) -> None:
            # Through a file object: torch logs a warning for a path not ending in .pt2, as a temp file's does not.
            with open(path, "wb") as f:
                torch.export.save(program, f, extra_files=records)

        return write, (lambda path: load_export(path, "pt2")(example))
    if fmt == "torchscript":
        return _torchscript_writer(model, example, records)
    return _onnx_writer(model, example, {0: batch}, records)


def export_records(path: str | Path) -> dict:
    """The records an export carries (classes.json, preprocessing.json), as JSON data; an older export lacks some."""
    path = Path(path)
    found = dict.fromkeys(RECORDS, "")
    if path.suffix == ".pt2":
        torch.export.load(path, extra_files=found)
    elif path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        found = {name: props.get(name.removesuffix(".json"), "") for name in RECORDS}
    else:
        with warnings.catch_warnings(action="ignore", category=FutureWarning):
            torch.jit.load(str(path), _extra_files=found)
    return {name: json.loads(text) for name, text in found.items() if text}


def export_classes(path: str | Path) -> list[str]:
    """The class names an export carries, by its suffix (.pt2, .onnx, else torchscript)."""
    classes = export_records(path).get(CLASSES_FILE)
    if not classes:
        raise ExportError(f"{path} carries no class names")
    return classes


def _torchscript_writer(model: nn.Module, example: torch.Tensor, records: dict) -> tuple[Callable, Callable]:
    # TorchScript is deprecated in torch, and each of its calls says so; it is
    # here for runtimes that still read only it. Prefer pt2.
    quiet = functools.partial(warnings.catch_warnings, action="ignore", category=FutureWarning)
    with quiet():
        traced = torch.jit.trace(model, example)

    def write(path: Path) -> None:
        with quiet():
            torch.jit.save(traced, str(path), _extra_files=records)

    return write, (lambda path: load_export(path, "torchscript")(example))


# The suffixes predict runs as an export, and the format each one is.
EXPORT_SUFFIXES = {".pt2": "pt2", ".onnx": "onnx", ".torchscript": "torchscript", ".ts": "torchscript"}


def load_export(path: str | Path, fmt: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pt2, onnx or TorchScript file (`fmt`, else its suffix) as a function of a CPU batch: eager's logits."""
    path = Path(path)
    fmt = fmt or EXPORT_SUFFIXES.get(path.suffix)
    if fmt == "pt2":
        with open(path, "rb") as f:  # a file object: any name, no warning about it
            return torch.export.load(f).module()
    if fmt == "torchscript":
        with warnings.catch_warnings(action="ignore", category=FutureWarning):
            return torch.jit.load(str(path), map_location="cpu")
    if fmt != "onnx":
        raise ExportError(f"{path}: an export to run is a {', '.join(EXPORT_SUFFIXES)} file")
    _onnx_packages()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda inputs: torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])


def _onnx_packages() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError:
        raise ExportError(
            "ONNX export needs onnx, onnxscript and onnxruntime: install the project's onnx extra "
            "(pip install -e '.[onnx]') or pip install onnx onnxscript onnxruntime"
        ) from None


def _onnx_writer(model: nn.Module, example: torch.Tensor, dims: dict, records: dict) -> tuple[Callable, Callable]:
    _onnx_packages()
    import onnx

    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(dims,), verbose=False)

    def run(path: Path) -> torch.Tensor:
        return load_export(path, "onnx")(example)

    def write(path: Path) -> None:
        program.save(str(path))
        saved = onnx.load(str(path))
        onnx.helper.set_model_props(saved, {name.removesuffix(".json"): text for name, text in records.items()})
        onnx.save(saved, str(path))

    return write, run
