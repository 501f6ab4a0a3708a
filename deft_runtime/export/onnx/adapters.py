"""The adapters of an export: ``--adapter`` values, where each comes from (a path, or a name looked up
through an injected :class:`AdapterSource`), their identity, and the merge into the denoiser."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from deft_runtime.adapter import Adapter
from deft_runtime.compile import CompiledAdapter, compile_adapter, linear_weights, merge_into
from deft_runtime.errors import AdapterNotFound, DeftError
from deft_runtime.export.onnx.manifest import AdapterEntry
from deft_runtime.export.onnx.options import OnnxExportError
from deft_runtime.formats import DEFAULT_LIMITS, ReadLimits, load_adapter


class AdapterSource(Protocol):
    """Where an adapter given by name (not by path) comes from. The runtime knows no registry: the
    command line injects one (``deft_cli`` reads the server's registry)."""

    @property
    def location(self) -> str:
        """Where names are looked up, for messages and the manifest (e.g. ``the registry in DIR``)."""
        ...

    def __call__(self, name: str, unet_config: Mapping[str, Any] | None) -> Adapter:
        """The adapter registered as ``name``; ``unet_config`` maps kohya block names onto the base.
        Raises ``AdapterNotFound`` when there is none."""
        ...


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter`` value: ``NAME_OR_PATH`` or ``NAME_OR_PATH:WEIGHT``."""

    source: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> AdapterSpec:
        """An existing path is taken whole (even with a ``:`` in it); otherwise a trailing
        ``:NUMBER`` is the weight."""
        if not spec:
            raise OnnxExportError("--adapter needs NAME_OR_PATH or NAME_OR_PATH:WEIGHT, got ''")
        if os.path.exists(os.path.expanduser(spec)):
            return cls(spec)
        head, sep, tail = spec.rpartition(":")
        if not sep:
            return cls(spec)
        try:
            weight = float(tail)
        except ValueError:
            raise OnnxExportError(
                f"--adapter {spec!r}: not an existing path, and {tail!r} after the last ':' is not a "
                "number; expected NAME_OR_PATH or NAME_OR_PATH:WEIGHT"
            ) from None
        if not head:
            raise OnnxExportError(f"--adapter {spec!r}: the name or path before ':' is empty")
        if not math.isfinite(weight):
            raise OnnxExportError(f"--adapter {spec!r}: the weight must be a finite number")
        return cls(head, weight)


@dataclass
class ResolvedAdapter:
    """An adapter read from disk or from a registry, with what the manifest records about it."""

    spec: AdapterSpec
    adapter: Adapter
    origin: Literal["path", "registry"]
    location: str  # absolute path, or the registry it was read from
    sha256: str  # content digest of the adapter's tensors (the same whatever the file format)
    source_sha256: str | None  # digest of the bytes on disk (file, or sorted directory tree)

    def manifest_entry(self) -> AdapterEntry:
        a = self.adapter
        return AdapterEntry(
            source=self.spec.source,
            origin=self.origin,
            location=self.location,
            weight=self.spec.weight,
            kind=a.kind.value,
            decomposition=a.decomposition.value if a.decomposition else None,
            layers=len(a.layers),
            ranks=sorted(set(a.ranks.values())),
            sha256=self.sha256,
            source_sha256=self.source_sha256,
        )


def adapter_sha256(adapter: Adapter) -> str:
    """sha256 over kind, decomposition and every layer's scale and tensors (dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(f"{adapter.kind.value}|{adapter.decomposition.value if adapter.decomposition else ''}".encode())
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        h.update(f"\n{name}|{layer.scale!r}".encode())
        for role, t in layer.tensors().items():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"|{role}:{t.dtype}:{list(t.shape)}:".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _path_sha256(path: Path) -> str:
    """A file's sha256, or for a directory the sha256 of ``relative/path  sha256`` lines, sorted."""
    if path.is_file():
        return file_sha256(path)
    lines = [
        f"{p.relative_to(path).as_posix()}  {file_sha256(p)}\n"
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def resolve_adapter(
    spec: AdapterSpec,
    *,
    source: AdapterSource | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
    unet_config: Mapping[str, Any] | None = None,
) -> ResolvedAdapter:
    """A path if ``spec.source`` exists on disk (any format ``load_adapter`` reads), else a name that
    ``source`` looks up."""
    path = Path(spec.source).expanduser()
    if path.exists():
        adapter = load_adapter(path, limits=limits, unet_config=unet_config)
        return ResolvedAdapter(
            spec, adapter, "path", str(path.resolve()), adapter_sha256(adapter), _path_sha256(path)
        )
    neither = f"adapter {spec.source!r} is neither an existing file or directory"
    if source is None:
        raise AdapterNotFound(f"{neither} nor a registered name: no registry to look names up in")
    try:
        adapter = source(spec.source, unet_config)
    except AdapterNotFound as e:
        raise AdapterNotFound(f"{neither} nor a name registered in {source.location} ({e})") from e
    raw = adapter.metadata.get("sha256") if adapter.metadata else None
    return ResolvedAdapter(spec, adapter, "registry", source.location, adapter_sha256(adapter), raw)


def merge_adapters(denoiser: nn.Module, adapters: Sequence[ResolvedAdapter]) -> list[CompiledAdapter]:
    """Merge every adapter into ``denoiser`` in place: ``W = W0 + Σ weight·B·A``.

    All adapters are compiled against the *unmerged* base first (a DEFT/PaRa update depends on W0),
    exactly as the serving path applies several adapters to one row."""
    compiled = []
    for resolved in adapters:
        try:
            base = linear_weights(denoiser, list(resolved.adapter.layers))
            compiled.append(compile_adapter(resolved.adapter, base))
        except DeftError as e:
            raise type(e)(f"adapter {resolved.spec.source!r}: {e}") from e
    for resolved, c in zip(adapters, compiled, strict=True):
        merge_into(denoiser, c, resolved.spec.weight)
    return compiled
