"""Export a trained model to ONNX for serving, and check the export with onnxruntime when it is installed."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedbus.bus.errors import FedbusError

__all__ = ["ExportError", "export_onnx", "verify_onnx"]


class ExportError(FedbusError):
    """The ONNX export failed, or the exported model disagrees with the torch one."""


def export_onnx(model: nn.Module, path: str | Path, *, features: int, opset: int = 17) -> Path:
    """Write ``model`` (input: a float32 batch × ``features``) to ``path``; the batch size stays dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(1, features)
    try:
        # The TorchScript exporter: the torch.export-based one needs onnxscript, which the ml extra does not
        # install; its deprecation notice is expected here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:  # torch raises many types here; report them as one
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return path


def verify_onnx(
    path: str | Path, model: nn.Module, x: npt.NDArray[np.float32], *, atol: float = 1e-4
) -> float:
    """Run the ONNX file with onnxruntime and compare with torch; returns the max abs difference.

    Raises :class:`ExportError` when they differ by more than ``atol`` (or onnxruntime is missing).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("onnxruntime is not installed") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"x": np.ascontiguousarray(x, np.float32)})
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise ExportError(f"onnxruntime output differs from torch by {diff:g} (> {atol:g})")
    return diff
