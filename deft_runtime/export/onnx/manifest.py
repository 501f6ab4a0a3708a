"""The typed ``manifest.json`` of an export: what was exported, from what, and how it was checked.

Every record is a dataclass; :meth:`Manifest.to_json` is the file's content (optional entries that
are absent, a file's ``external_data`` and ``validation``, are left out rather than written as null).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "deft.onnx-export"
FORMAT_VERSION = 1
EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"
MERGE_RULE = "W = W0 + sum(weight * B @ A) per target Linear, every adapter compiled against W0"


@dataclass(frozen=True)
class AdapterEntry:
    source: str  # the --adapter value (path or name)
    origin: Literal["path", "registry"]
    location: str
    weight: float
    kind: str
    decomposition: str | None
    layers: int
    ranks: list[int]
    sha256: str  # content digest of the adapter's tensors
    source_sha256: str | None  # digest of the bytes it was read from


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]  # a str is a dynamic axis, by name


@dataclass(frozen=True)
class ValidationRun:
    batch: int
    input_shapes: dict[str, list[int]]
    max_abs_error: float
    output_max_abs: float
    bound: float
    passed: bool


@dataclass(frozen=True)
class FileValidation:
    provider: str
    rule: str
    tolerance: float
    max_abs_error: float
    passed: bool
    runs: list[ValidationRun]


@dataclass
class FileEntry:
    path: str  # relative to the output folder
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None  # weights file beside a graph above 1 GiB
    export_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    validation: FileValidation | None = None
    sha256: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    pipeline: str


@dataclass(frozen=True)
class ValidationSummary:
    rule: str
    tolerance: float
    batch_sizes: list[int]
    max_abs_error: float
    passed: bool


@dataclass
class Manifest:
    deft_version: str
    torch_version: str
    opset: int
    model: ModelEntry
    adapters: list[AdapterEntry]
    files: dict[str, FileEntry]
    validation: ValidationSummary | None
    seconds: float
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    exporter: str = EXPORTER
    dtype: str = "float32"
    merge: str = MERGE_RULE

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for entry in data["files"].values():
            for optional in ("external_data", "validation"):
                if entry[optional] is None:
                    del entry[optional]
        order = ["format", "format_version", "deft_version", "torch_version", "exporter", "opset", "dtype"]
        return {**{key: data.pop(key) for key in order}, **data}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


@dataclass
class ExportResult:
    out_dir: Path
    manifest_path: Path
    manifest: Manifest

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.out_dir / entry.path for name, entry in self.manifest.files.items()}
