"""Heterogeneous multi-adapter kernels behind one interface; the backend is chosen once, at construction.

Every backend computes the same thing for one wrapped layer (pseudo-code, shapes)::

    # x: [R, T, d_in]   y: [R, T, d_out] (the base layer's output, updated in place)
    for i in range(R):                                   # rows of the denoiser batch
        for k in range(K):                               # up to K blended adapters per row
            s = batch.slots[i, k]
            if s == NO_ADAPTER: continue                 # explicit sentinel, never an index
            r = pages.ranks[s]                           # this slot's rank in this layer (0: not targeted)
            p = pages.page_table[s, :r]                  # its pages in this layer's pool
            v = x[i] @ pages.A[p].T                      # shrink: [T, r]
            y[i] += batch.weights[i, k] * (v @ pages.B[p])   # expand + fused add: [T, d_out]

``pages.A[p]`` is row ``p`` of the compiled ``A`` (``[r, d_in]``) and ``pages.B[p]`` the matching
column of ``B`` (``[d_out, r]``), so a rank-r adapter occupies exactly r pages: no padding to a maximum
rank (S-LoRA's unified paging, one page per rank vector). The Triton kernels accumulate in float32; the
torch backend computes in the serving dtype (its matmuls accumulate in float32 internally).

Backends:

- ``torch`` (:mod:`.torch_ops`): the reference and the CPU path, gathered matmuls per segment.
- ``triton`` (:mod:`.triton_ops`): segmented shrink/expand kernels (Punica SGMV style) that loop only
  over each row's own pages; registered as torch custom ops so ``torch.compile`` and CUDA graphs work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from deft_runtime.batch import AdapterBatch

BackendName = Literal["auto", "torch", "triton"]


@dataclass
class LayerPages:
    """One wrapped layer's share of the adapter pool (owned and written by the pool, read by ops).

    - ``A``: ``[num_pages, d_in]``, ``B``: ``[num_pages, d_out]`` (serving dtype, on the device)
    - ``page_table``: int32 ``[max_slots, max_rank]``; row ``s`` lists slot ``s``'s pages
    - ``ranks``: int32 ``[max_slots]``; 0 where the slot's adapter does not target this layer
    - ``page_index``: host-side mirror so the torch backend never synchronises with the device to learn
      a slot's pages; ``page_index[s]`` is a ``slice`` when the slot's pages are contiguous (the
      usual case: ``A[slice]`` is a view, no gather) and an int64 index tensor otherwise
    """

    A: torch.Tensor
    B: torch.Tensor
    page_table: torch.Tensor
    ranks: torch.Tensor
    page_index: list[torch.Tensor | slice | None] = field(default_factory=list)

    @classmethod
    def allocate(
        cls,
        d_in: int,
        d_out: int,
        num_pages: int,
        max_slots: int,
        max_rank: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> LayerPages:
        return cls(
            A=torch.zeros(num_pages, d_in, dtype=dtype, device=device),
            B=torch.zeros(num_pages, d_out, dtype=dtype, device=device),
            page_table=torch.zeros(max_slots, max_rank, dtype=torch.int32, device=device),
            ranks=torch.zeros(max_slots, dtype=torch.int32, device=device),
            page_index=[None] * max_slots,
        )

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[1])


class AdapterOps(ABC):
    """A multi-adapter backend. Implementations are stateless apart from their own scratch buffers."""

    name: ClassVar[str]

    @abstractmethod
    def add_adapters(
        self, y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
    ) -> torch.Tensor:
        """``y[i] += Σ_k w_ik · B_k · (A_k · x[i])`` (module docstring); returns ``y``.

        ``x: [R, T, d_in]``, ``y: [R, T, d_out]`` with ``R == batch.num_rows``.
        """


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_ops(backend: BackendName, device: torch.device) -> AdapterOps:
    """Resolve ``auto`` (Triton on CUDA when installed, else torch) and build the backend once."""
    from deft_runtime.ops.torch_ops import TorchOps

    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package: pip install 'deft[triton]'")
        from deft_runtime.ops.triton_ops import TritonOps

        return TritonOps()
    raise ValueError(f"unknown backend {backend!r}; expected auto, torch or triton")
