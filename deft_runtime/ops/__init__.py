"""Heterogeneous multi-adapter kernels behind one interface; the backend is chosen once, at construction.

Every backend computes the same thing for one wrapped layer (pseudo-code, shapes)::

    # x: [R, T, d_in]   y: [R, T, d_out] (the base layer's output, updated in place)
    for i in range(R):                                   # rows of the denoiser batch
        for (s, w) in batch.rows[i]:                     # up to K blended adapters per row
            r = pages.ranks[s]                           # this slot's rank in this layer (0: not targeted)
            p = pages.page_table[s, :r]                  # its pages in this layer's pool
            v = x[i] @ pages.A[p].T                      # shrink: [T, r]
            y[i] += w * (v @ pages.B[p])                 # expand + fused add: [T, d_out]

``pages.A[p]`` is row ``p`` of the compiled ``A`` (``[r, d_in]``) and ``pages.B[p]`` the matching
column of ``B`` (``[d_out, r]``), so a rank-r adapter occupies exactly r pages: no padding to a maximum
rank (S-LoRA's unified paging, one page per rank vector). The Triton kernels accumulate in float32; the
torch backend computes in the serving dtype (its matmuls accumulate in float32 internally).

Each backend owns its per-forward metadata: :meth:`AdapterOps.prepare` (called by
:meth:`AdapterBatch.set <deft_runtime.batch.AdapterBatch.set>`, once per forward, outside compiled code)
fills the backend's preallocated buffers from the batch's neutral ``(slot, weight)`` rows and does nothing
when the mapping equals the one it prepared last, as it does for consecutive steps of the same requests.

Backends:

- ``torch`` (:mod:`.torch_ops`): the reference and the CPU path; ``prepare`` groups rows by slot into
  runs of consecutive rows, and a layer runs two gathered matmuls per run (views only), or two batched
  matmuls for all slots when their runs tile a block of rows (one adapter per request), with each
  layer's stacked pages kept while its slots stay published (``StackCache``).
- ``triton`` (:mod:`.triton_ops`): ``prepare`` writes dense ``[R, K]`` slot and weight tensors; BGMV-style
  shrink/expand kernels, one program per (row, token block, pair or output block), loop only over each
  row's own pages; registered as a torch custom op so ``torch.compile`` and CUDA graphs work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from deft_runtime.batch import NO_ADAPTER, AdapterBatch, Mapping, RowAdapters

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
    """A multi-adapter backend serving one :class:`AdapterBatch` (build the batch with ``backend=ops``).

    It owns its per-forward metadata and scratch buffers, allocated once for the batch's limits; the
    ``metadata_updates`` counter says how often a new mapping was prepared (repeats are skipped).
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._batch: AdapterBatch | None = None
        self._prepared: Mapping | None = None
        self.metadata_updates = 0

    def prepare(self, batch: AdapterBatch) -> None:
        """Make the backend's metadata describe ``batch.rows``; nothing to do if it already does.

        Pseudo-code::

            if batch.rows == last_prepared: return       # the same requests' next step
            update(batch.rows)                            # backend-specific buffers, in place
        """
        if self._batch is None:
            self.allocate(batch)
            self._batch = batch
        elif batch is not self._batch:
            raise ValueError("this backend already serves another AdapterBatch; build one backend per batch")
        if batch.rows == self._prepared:
            return
        self.update(batch.rows)
        self._prepared = batch.rows
        self.metadata_updates += 1

    def check_prepared(self, batch: AdapterBatch) -> None:
        """Refuse a batch whose mapping this backend never saw (its buffers would describe another)."""
        if batch is not self._batch:
            raise ValueError(
                f"the {self.name} backend was not prepared for this AdapterBatch: build the batch with "
                "AdapterBatch(..., backend=ops) so set() prepares it"
            )

    @abstractmethod
    def allocate(self, batch: AdapterBatch) -> None:
        """Preallocate metadata buffers for ``batch.max_rows`` rows of ``batch.K`` pairs (once)."""

    @abstractmethod
    def update(self, rows: Mapping) -> None:
        """Rewrite the metadata buffers for ``rows`` (only when the mapping changed)."""

    @abstractmethod
    def add_adapters(
        self, y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
    ) -> torch.Tensor:
        """``y[i] += Σ_k w_ik · B_k · (A_k · x[i])`` (module docstring); returns ``y``.

        ``x: [R, T, d_in]``, ``y: [R, T, d_out]`` with ``R == batch.num_rows``.
        """


def pack_rows(rows: Sequence[RowAdapters], K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense host tensors of a mapping: int32 ``slots`` and float32 ``weights``, ``[len(rows), K]``.

    Pseudo-code::

        slots[:, :] = NO_ADAPTER;  weights[:, :] = 0
        for i, k:  slots[i, k], weights[i, k] = rows[i][k]
    """
    slot_rows = [[NO_ADAPTER] * K for _ in rows]
    weight_rows = [[0.0] * K for _ in rows]
    for i, pairs in enumerate(rows):
        for k, (slot, weight) in enumerate(pairs):
            slot_rows[i][k], weight_rows[i][k] = slot, weight
    slots = torch.tensor(slot_rows, dtype=torch.int32).view(len(rows), K)
    return slots, torch.tensor(weight_rows, dtype=torch.float32).view(len(rows), K)


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
