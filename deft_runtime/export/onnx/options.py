"""What an ONNX export may be asked for, its errors, and the optional dependencies it needs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deft_runtime.errors import DeftError
from deft_runtime.formats import DEFAULT_LIMITS, ReadLimits

MIN_OPSET = 17
#: the newest opset the TorchScript exporter of the supported torch releases emits
MAX_OPSET = 20
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
MANIFEST_NAME = "manifest.json"
#: batch sizes every exported file is validated at (two, so a frozen batch axis cannot pass)
VALIDATION_BATCHES = (1, 3)
#: the acceptance rule of every validated file (recorded in the manifest)
VALIDATION_RULE = "max|onnx - torch| <= tolerance * max(1, max|torch|)"

#: receives one line per stage ("loading tiny-sdxl", "exporting unet → …")
Progress = Callable[[str], None]


class OnnxExportError(DeftError):
    """The export was refused or failed (unsupported model or option, exporter failure)."""


class OnnxValidationError(OnnxExportError):
    """onnxruntime's output differs from torch's by more than the tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    """Which graphs to write and how to check them (``deft export-onnx`` flags)."""

    text_encoders: bool = False
    vae_decoder: bool = False
    opset: int = DEFAULT_OPSET
    validate: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    limits: ReadLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise OnnxExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {self.opset}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise OnnxExportError(f"--tolerance must be a positive number, got {self.tolerance}")


def import_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or an error naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise OnnxExportError(
            f"ONNX export needs the 'onnx' extra (onnx, onnxscript, onnxruntime): pip install 'deft[onnx]' ({e})"
        ) from e
    return onnx, onnxruntime
