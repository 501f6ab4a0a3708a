"""The compiled-factor cache file: laid out as the adapter pool's pages want it, read in one go.

A compiled adapter is written as a safetensors file (a JSON offset table, then one contiguous blob)
holding, per wrapped layer, ``{layer}.A`` ``[r, d_in]`` and ``{layer}.Bt`` ``[r, d_out]`` (``B``
transposed: the pool's page rows), float32, contiguous. Loading it is one ``readinto`` of the whole file
into one buffer and a zero-copy view per tensor, so the pool then copies each layer's rows into its pages
with no transposes or casts (on a float32 pool): the cold load is one read plus one copy per layer.

The file is this process's own cache, but a disk can corrupt it: every offset, shape and dtype is
checked against the file's size, and anything off makes :func:`read_compiled` return None (the caller
recompiles from the uploaded adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deft_runtime.compile import CompiledAdapter, LowRankFactors

#: ``format`` metadata value; files of older layouts (B, not Bt) are simply not ours any more
COMPILED_FORMAT = "deft.compiled.v2"
_MAX_HEADER = 64 << 20


def compiled_tensors(compiled: CompiledAdapter) -> dict[str, torch.Tensor]:
    """What :func:`read_compiled` reads back: ``A`` and ``Bᵀ`` per layer, float32, contiguous."""
    tensors = {}
    for layer, f in compiled.factors.items():
        tensors[f"{layer}.A"] = f.A.float().contiguous()
        tensors[f"{layer}.Bt"] = f.B.T.float().contiguous()
    return tensors


def read_compiled(path: Path) -> tuple[dict[str, LowRankFactors], dict[str, str]] | None:
    """Per layer ``LowRankFactors(B=Bt.T, A)`` as views of one buffer read at once, and the file's
    metadata; None when the file is missing, truncated or not laid out as :func:`compiled_tensors`
    writes it."""
    try:
        with path.open("rb", buffering=0) as f:
            size = path.stat().st_size
            buffer = torch.empty(size, dtype=torch.uint8)
            if size < 8 or f.readinto(buffer.numpy().data) != size:
                return None
    except OSError:
        return None
    parsed = _header(buffer)
    if parsed is None:
        return None
    header, metadata, data_start = parsed
    if (size - data_start) % 4:
        return None
    floats = buffer[data_start:].view(torch.float32)  # every tensor is F32: views of this one view
    views = {name: _view(floats, info) for name, info in header.items()}
    if any(v is None for v in views.values()):
        return None
    factors = _factors(views)  # type: ignore[arg-type]
    return None if factors is None else (factors, metadata)


def _header(buffer: torch.Tensor) -> tuple[dict[str, dict], dict[str, str], int] | None:
    n = int.from_bytes(bytes(buffer[:8].numpy()), "little")
    if not 0 < n <= min(_MAX_HEADER, buffer.numel() - 8):
        return None
    try:
        header = json.loads(bytes(buffer[8 : 8 + n].numpy()))
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in header.values()):
        return None
    return header, metadata, 8 + n


def _view(floats: torch.Tensor, info: dict) -> torch.Tensor | None:
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if info.get("dtype") != "F32" or not isinstance(shape, list) or len(shape) != 2:
        return None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
        return None
    start, stop = offsets
    if not all(isinstance(d, int) and d >= 0 for d in shape) or stop - start != 4 * shape[0] * shape[1]:
        return None
    if start % 4 or start < 0 or stop > 4 * floats.numel():
        return None
    return floats[start // 4 : stop // 4].view(shape)


def _factors(views: dict[str, torch.Tensor]) -> dict[str, LowRankFactors] | None:
    factors = {}
    for key, A in views.items():
        if not key.endswith(".A"):
            continue
        layer = key.removesuffix(".A")
        Bt = views.get(f"{layer}.Bt")
        if Bt is None or Bt.shape[0] != A.shape[0]:
            return None
        factors[layer] = LowRankFactors(B=Bt.T, A=A)
    if 2 * len(factors) != len(views):
        return None
    return factors
