"""Export trained weights for inference, and check the export against eager.

Every format is written atomically, loaded back and run on the same batch of
2 as the eager model; the largest difference is printed, and an export that
does not reproduce the model is an error rather than a file you find out
about in production.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .batchnorm import fold_batchnorm, plain_batchnorm
from .checkpoint import atomic_path, atomic_write

FORMATS = ("pt2", "onnx", "torchscript")
# fp32 kernels of one model differ in summation order between runtimes; more
# than this on logits means the export computes something else.
TOLERANCE = 1e-3


class ExportError(RuntimeError):
    pass


def export(model: nn.Module, fmt: str, out: str | Path, example: torch.Tensor, fold_bn: bool = False) -> float:
    """Write `model` to `out` as `fmt`, traced on `example`; return the max abs difference to eager.

    Any FrozenBatchNorm or fixed-statistics layer becomes plain BatchNorm
    first, so runtimes see a standard op; `fold_bn` then folds each BatchNorm
    that follows a convolution into it. The difference is measured against
    the model as given, so a wrong fold fails like a wrong export.
    """
    model = plain_batchnorm(model).eval()
    # Batch size stays free in the exported graph; everything else is fixed.
    batch = torch.export.Dim("batch", min=1)
    out = Path(out)
    with torch.no_grad():
        expected = model(example)
        if fold_bn:
            fold_batchnorm(model)
        if fmt == "pt2":
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            atomic_write(out, lambda f: torch.export.save(program, f))
            got = torch.export.load(out).module()(example)
        elif fmt == "torchscript":
            # TorchScript is deprecated in torch; it is here for runtimes
            # that still read only it. Prefer pt2.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(model, example)
                atomic_write(out, lambda f: torch.jit.save(traced, f))
                got = torch.jit.load(out)(example)
        elif fmt == "onnx":
            got = _export_onnx(model, example, {0: batch}, out)
        else:
            raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    error = (got - expected).abs().max().item()
    if not error <= TOLERANCE:
        raise ExportError(f"{out}: the {fmt} export differs from the eager model by {error:.3g} (> {TOLERANCE})")
    return error


def _export_onnx(model: nn.Module, example: torch.Tensor, dims: dict, out: Path) -> torch.Tensor:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError:
        raise ExportError(
            "ONNX export needs onnx, onnxscript and onnxruntime: install the project's onnx extra "
            "(pip install -e '.[onnx]') or pip install onnx onnxscript onnxruntime"
        ) from None
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(dims,), verbose=False)
    with atomic_path(out) as tmp:
        program.save(str(tmp))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    return torch.from_numpy(result)
