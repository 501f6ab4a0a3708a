"""Checking an exported file: onnxruntime (CPU) against the torch module it came from, at two batch
sizes and two shapes, under the rule ``max|onnx - torch| <= tolerance * max(1, max|torch|)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deft_runtime.export.onnx.components import Component
from deft_runtime.export.onnx.manifest import FileValidation, ValidationRun
from deft_runtime.export.onnx.options import (
    VALIDATION_BATCHES,
    VALIDATION_RULE,
    OnnxValidationError,
    import_onnx,
)

PROVIDER = "CPUExecutionProvider"


def validate(component: Component, path: Path, tolerance: float) -> FileValidation:
    """Run ``path`` in onnxruntime at :data:`VALIDATION_BATCHES` against the torch module."""
    _, ort = import_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[PROVIDER])
    g = torch.Generator().manual_seed(1234)
    runs = [
        _run(component, session, path, batch, component.make_inputs(batch, variant, g), tolerance)
        for variant, batch in enumerate(VALIDATION_BATCHES)
    ]
    return FileValidation(
        provider=PROVIDER,
        rule=VALIDATION_RULE,
        tolerance=tolerance,
        max_abs_error=max(r.max_abs_error for r in runs),
        passed=all(r.passed for r in runs),
        runs=runs,
    )


def _run(
    component: Component,
    session: Any,
    path: Path,
    batch: int,
    inputs: tuple[torch.Tensor, ...],
    tolerance: float,
) -> ValidationRun:
    reference = component.reference or component.module
    with torch.no_grad():
        expected = reference(*inputs)
    expected_t = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(None, {n: t.numpy() for n, t in zip(component.input_names, inputs, strict=True)})
    error, scale = 0.0, 0.0
    for name, want, have in zip(component.output_names, expected_t, got, strict=True):
        want_np = want.detach().float().numpy()
        if tuple(have.shape) != tuple(want_np.shape):
            raise OnnxValidationError(
                f"{path.name}: output {name!r} has shape {list(have.shape)} in onnxruntime but "
                f"{list(want_np.shape)} in torch (batch {batch})"
            )
        error = max(error, float(np.max(np.abs(have.astype(np.float64) - want_np))))
        scale = max(scale, float(np.max(np.abs(want_np))))
    bound = tolerance * max(1.0, scale)
    return ValidationRun(
        batch=batch,
        input_shapes={n: list(t.shape) for n, t in zip(component.input_names, inputs, strict=True)},
        max_abs_error=error,
        output_max_abs=scale,
        bound=bound,
        passed=bool(error <= bound),
    )
