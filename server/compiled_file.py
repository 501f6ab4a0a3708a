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

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deft_runtime.compile import CompiledAdapter, LowRankFactors
from deft_runtime.pool import ReadSpans

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


def _extent(info: dict) -> tuple[int, int, int] | None:
    """``(start, rows, cols)`` of one header entry: an F32 matrix whose byte range matches its shape;
    None for anything else."""
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if info.get("dtype") != "F32" or not isinstance(shape, list) or len(shape) != 2:
        return None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
        return None
    start, stop = offsets
    if not all(isinstance(d, int) and d >= 0 for d in shape) or stop - start != 4 * shape[0] * shape[1]:
        return None
    return start, shape[0], shape[1]


def _view(floats: torch.Tensor, info: dict) -> torch.Tensor | None:
    extent = _extent(info)
    if extent is None:
        return None
    start, rows, cols = extent
    stop = start + 4 * rows * cols
    if start % 4 or start < 0 or stop > 4 * floats.numel():
        return None
    return floats[start // 4 : stop // 4].view(rows, cols)


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


@dataclass(frozen=True)
class _Span:
    layer: str
    role: str  # "A" or "Bt"
    start: int  # byte offset in the file
    rows: int
    cols: int


class CompiledReadPlan:
    """Where each layer's ``A`` and ``Bᵀ`` lie in a compiled file (from its header alone), to read them
    straight into the pool's pages: one ``preadv`` per 1024 tensors, no buffer, no second copy.

    Made by :func:`plan_compiled_read`; :meth:`read_into` returns False (and the caller takes the
    copying path) when the file changed size since, a destination does not fit, or the read came short.
    """

    def __init__(self, path: Path, size: int, data_start: int, spans: list[_Span]) -> None:
        self.path, self.size, self.data_start, self.spans = path, size, data_start, spans
        self.ranks = {s.layer: s.rows for s in spans if s.role == "A"}
        cols = {(s.layer, s.role): s.cols for s in spans}
        self.shapes = {
            layer: (cols[(layer, "Bt")], cols[(layer, "A")]) for layer in self.ranks
        }  # (d_out, d_in)
        self.nbytes = sum(4 * s.rows * s.cols for s in spans)
        layers = tuple(self.ranks)
        position = {layer: i for i, layer in enumerate(layers)}
        self._span_bytes = np.array([4 * s.rows * s.cols for s in spans], dtype=np.uint64)
        #: the same plan as arrays, for the pool's vectorised load (:meth:`read_iov` reads it)
        self.vector = ReadSpans(
            layers=layers,
            ranks=np.array([self.ranks[layer] for layer in layers], dtype=np.int64),
            d_out=np.array([self.shapes[layer][0] for layer in layers], dtype=np.int64),
            d_in=np.array([self.shapes[layer][1] for layer in layers], dtype=np.int64),
            span_layer=np.array([position[s.layer] for s in spans], dtype=np.int64),
            span_is_a=np.array([s.role == "A" for s in spans], dtype=bool),
            span_bytes=self._span_bytes.astype(np.int64),
            read=self.read_iov,
        )

    def read_into(self, dests: dict[str, tuple[Any, Any]]) -> bool:
        """Read every layer's ``A`` into ``dests[layer][0]`` and ``Bᵀ`` into ``dests[layer][1]``: numpy
        float32 arrays of exactly those shapes, C-contiguous (writable buffers that ``preadv`` fills)."""
        views: list[Any] = []
        for s in self.spans:
            dest = dests[s.layer][0 if s.role == "A" else 1]
            if dest.dtype != np.float32 or dest.shape != (s.rows, s.cols) or not dest.flags.c_contiguous:
                return False
            views.append(dest)
        try:
            with self.path.open("rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != self.size:
                    return False
                offset = self.data_start
                for i in range(0, len(views), _IOV_MAX):
                    chunk = views[i : i + _IOV_MAX]
                    want = sum(v.nbytes for v in chunk)
                    if os.preadv(f.fileno(), chunk, offset) != want:
                        return False
                    offset += want
        except OSError:
            return False
        return True

    def read_iov(self, iov: np.ndarray) -> bool:
        """Read the file's tensors, in file order, into the buffers of an iovec array (uint64 ``[k, 2]``:
        address, length; one row per tensor, each length exactly that tensor's bytes). The caller owns
        the addresses (the pool computes them from its own page buffers); this checks that the lengths
        describe this file, so exactly its bytes land, and returns False when it changed size since
        the plan or a read came short."""
        if iov.dtype != np.uint64 or iov.shape != (len(self.spans), 2) or not iov.flags.c_contiguous:
            return False
        if _preadv is None or not bool((iov[:, 1] == self._span_bytes).all()):
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != self.size:
                return False
            offset = self.data_start
            for i in range(0, len(iov), _IOV_MAX):
                chunk = iov[i : i + _IOV_MAX]
                want = int(chunk[:, 1].sum())
                if _preadv(fd, chunk.ctypes.data, len(chunk), offset) != want:
                    return False
                offset += want
        except OSError:
            return False
        finally:
            os.close(fd)
        return True


#: buffers per ``preadv`` call (Linux's IOV_MAX)
_IOV_MAX = 1024


def _libc_preadv() -> Any:
    """libc's ``preadv`` taking an iovec array's address (``os.preadv`` wants one Python buffer per
    tensor), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).preadv
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    fn.restype = ctypes.c_ssize_t
    return fn


_preadv = _libc_preadv()


def plan_compiled_read(path: Path) -> tuple[CompiledReadPlan, dict[str, str]] | None:
    """The read plan of a compiled file and its metadata, from the header alone; None when the file is
    missing, or not laid out as :func:`compiled_tensors` writes it with its tensors back to back (then
    :func:`read_compiled` decides)."""
    if not hasattr(os, "preadv"):
        return None
    try:
        with path.open("rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                return None
            raw = f.read(n)
    except OSError:
        return None
    buffer = torch.frombuffer(bytearray(head + raw), dtype=torch.uint8)
    parsed = _header(buffer)
    if parsed is None:
        return None
    header, metadata, data_start = parsed
    spans = []
    for key, info in header.items():
        layer, dot, role = key.rpartition(".")
        extent = _extent(info)
        if not dot or role not in ("A", "Bt") or extent is None:
            return None
        spans.append(_Span(layer, role, *extent))
    spans.sort(key=lambda s: s.start)
    position = 0
    for s in spans:  # back to back from the start of the data, ending at the end of the file
        if s.start != position:
            return None
        position += 4 * s.rows * s.cols
    if data_start + position != size:
        return None
    roles: dict[str, dict[str, _Span]] = {}
    for s in spans:
        roles.setdefault(s.layer, {})[s.role] = s
    if any(set(r) != {"A", "Bt"} or r["A"].rows != r["Bt"].rows for r in roles.values()):
        return None
    return CompiledReadPlan(path, size, data_start, spans), metadata
