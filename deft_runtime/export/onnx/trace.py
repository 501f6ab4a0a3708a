"""Tracing one component into an ``.onnx`` file, and reading back the signature the file declares."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deft_runtime.export.onnx.components import Component
from deft_runtime.export.onnx.manifest import TensorSpec
from deft_runtime.export.onnx.options import OnnxExportError, import_onnx

#: protobuf cannot hold a model above 2 GiB; larger ones keep their weights in ``<file>.data``
_EXTERNAL_DATA_BYTES = 1 << 30


def export_one(component: Component, path: Path, opset: int) -> None:
    """Trace ``component`` into ``path`` (weights beside it in ``<name>.onnx.data`` above 1 GiB)."""
    onnx, _ = import_onnx()
    example = component.make_inputs(2, 0, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix=f".{component.name}-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        try:
            with warnings.catch_warnings(), component.export_context(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings on shape-derived Python values
                torch.onnx.export(
                    component.module,
                    example,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=component.input_names,
                    output_names=component.output_names,
                    dynamic_axes=component.dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as e:
            raise OnnxExportError(
                f"torch.onnx.export failed on {component.name}: {type(e).__name__}: {e}"
            ) from e
        # re-save in one place: either one self-contained file, or the graph plus one data file
        model = onnx.load(str(raw), load_external_data=True)
        for output in model.graph.output:
            for axis, size in component.fixed_output_dims.get(output.name, {}).items():
                output.type.tensor_type.shape.dim[axis].dim_value = size  # clears the auto dim_param
        weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        if weights >= _EXTERNAL_DATA_BYTES:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def io_spec(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the ONNX file declares them: name, element type, shape (dims by name)."""
    onnx, _ = import_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values: Any) -> list[TensorSpec]:
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            rows.append(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return rows

    return describe(graph.input), describe(graph.output)
