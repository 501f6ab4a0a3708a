"""The export, stage by stage: load the base, read and merge the adapters, trace and check each
graph, write the manifest."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deft_runtime import __version__
from deft_runtime.export.onnx.adapters import (
    AdapterSource,
    AdapterSpec,
    ResolvedAdapter,
    file_sha256,
    merge_adapters,
    resolve_adapter,
)
from deft_runtime.export.onnx.components import Component, components_for
from deft_runtime.export.onnx.manifest import (
    ExportResult,
    FileEntry,
    Manifest,
    ModelEntry,
    ValidationSummary,
)
from deft_runtime.export.onnx.options import (
    MANIFEST_NAME,
    VALIDATION_BATCHES,
    VALIDATION_RULE,
    ExportOptions,
    OnnxValidationError,
    Progress,
    import_onnx,
)
from deft_runtime.export.onnx.trace import export_one, io_spec
from deft_runtime.export.onnx.validation import validate


def export_onnx(
    model: str,
    out_dir: str | os.PathLike[str],
    *,
    adapters: Sequence[AdapterSpec | str] = (),
    options: ExportOptions | None = None,
    adapter_source: AdapterSource | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export ``model``'s denoiser with ``adapters`` merged (an adapter that is not a path is a name
    ``adapter_source`` looks up) into ``out_dir``, check each file with onnxruntime, and write
    ``manifest.json``; :class:`OnnxValidationError` (after the manifest, which records it) when a
    file differs from torch beyond the tolerance."""
    options = options or ExportOptions()
    say = progress or (lambda _message: None)
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec.parse(a) for a in adapters]
    import_onnx()
    started = time.monotonic()
    base = _Base.load(model, cache_dir, options, say)
    resolved = base.merge(base.read_adapters(specs, adapter_source, options, say), say)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {c.name: _export_file(c, out, options, say) for c in base.components}
    manifest = Manifest(
        deft_version=__version__,
        torch_version=torch.__version__,
        opset=options.opset,
        model=ModelEntry(model, base.architecture, type(base.pipe).__name__),
        adapters=[r.manifest_entry() for r in resolved],
        files=files,
        validation=_summary(files, options),
        seconds=round(time.monotonic() - started, 3),
    )
    manifest.write(out / MANIFEST_NAME)
    _raise_on_failures(manifest, out / MANIFEST_NAME)
    return ExportResult(out, out / MANIFEST_NAME, manifest)


@dataclass
class _Base:
    """The loaded pipeline, its denoiser and the graphs to export from it."""

    pipe: Any
    architecture: str
    denoiser: nn.Module
    components: list[Component]

    @classmethod
    def load(
        cls, model: str, cache_dir: str | os.PathLike[str] | None, options: ExportOptions, say: Progress
    ) -> _Base:
        from deft_runtime.models import architecture_of, denoiser_of, load_pipeline

        say(f"loading {model}")
        pipe = load_pipeline(model, torch_dtype=torch.float32, device="cpu", cache_dir=cache_dir)
        architecture = architecture_of(pipe)
        components = components_for(pipe, architecture, options)  # refuse early
        for module in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "vae")):
            if isinstance(module, nn.Module):
                module.eval()
        return cls(pipe, architecture, denoiser_of(pipe).eval(), components)

    def read_adapters(
        self,
        specs: Sequence[AdapterSpec],
        source: AdapterSource | None,
        options: ExportOptions,
        say: Progress,
    ) -> list[ResolvedAdapter]:
        unet_config = dict(self.denoiser.config) if self.architecture == "sdxl" else None  # type: ignore[arg-type]
        resolved = []
        for spec in specs:
            say(f"reading adapter {spec.source}")
            resolved.append(
                resolve_adapter(spec, source=source, limits=options.limits, unet_config=unet_config)
            )
        return resolved

    def merge(self, resolved: list[ResolvedAdapter], say: Progress) -> list[ResolvedAdapter]:
        if resolved:
            say(f"merging {len(resolved)} adapter(s) into the {self.components[0].name}")
            merge_adapters(self.denoiser, resolved)
        return resolved


def _export_file(component: Component, out: Path, options: ExportOptions, say: Progress) -> FileEntry:
    path = out / f"{component.name}.onnx"
    say(f"exporting {component.name} → {path}")
    t0 = time.monotonic()
    export_one(component, path, options.opset)
    inputs, outputs = io_spec(path)
    data = path.with_name(path.name + ".data")
    entry = FileEntry(
        path=path.name,
        inputs=inputs,
        outputs=outputs,
        external_data=data.name if data.exists() else None,
        export_seconds=round(time.monotonic() - t0, 3),
        notes=component.notes,
    )
    if options.validate:
        say(f"validating {component.name} with onnxruntime at batch sizes {list(VALIDATION_BATCHES)}")
        entry.validation = validate(component, path, options.tolerance)
    entry.sha256 = file_sha256(path)
    return entry


def _summary(files: dict[str, FileEntry], options: ExportOptions) -> ValidationSummary | None:
    checks = [f.validation for f in files.values() if f.validation is not None]
    if not options.validate or not checks:
        return None
    return ValidationSummary(
        rule=f"{VALIDATION_RULE}, per file and batch size",
        tolerance=options.tolerance,
        batch_sizes=list(VALIDATION_BATCHES),
        max_abs_error=max(c.max_abs_error for c in checks),
        passed=all(c.passed for c in checks),
    )


def _raise_on_failures(manifest: Manifest, manifest_path: Path) -> None:
    failures = [
        f"{name}: max abs error {entry.validation.max_abs_error:.3g}"
        for name, entry in manifest.files.items()
        if entry.validation is not None and not entry.validation.passed
    ]
    if failures:
        tolerance = manifest.validation.tolerance if manifest.validation else 0.0
        raise OnnxValidationError(
            f"onnxruntime output differs from torch beyond tolerance {tolerance:g} "
            f"(rule: {VALIDATION_RULE}): {'; '.join(failures)}. Details in {manifest_path}"
        )
